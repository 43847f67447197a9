"""Lesson 08, the design space: what each design costs, and what each learned in the same short run."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .common import _finish


def plot_design_costs(rows: list[dict], show: bool = True):
    """Per design: image tokens in the decoder's input, and the FLOPs one image adds (connector + fusion).

    rows: [{"name", "decoder_tokens", "connector_flops", "fusion_flops"}, ...] as the lesson builds them from
    `connector_cost` and `fusion_cost`."""
    names = [r["name"] for r in rows]
    y = np.arange(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.55 * len(rows) + 1.6), sharey=True)
    left.barh(y, [r["decoder_tokens"] for r in rows], color="#c8671a")
    for k, r in enumerate(rows):
        left.text(r["decoder_tokens"], k, f" {r['decoder_tokens']}", va="center", fontsize=9)
    left.set_yticks(y, names)
    left.invert_yaxis()
    left.set_xlabel("image tokens in the decoder's input")
    connector = np.array([r["connector_flops"] or 0 for r in rows], dtype=float) / 1e6
    fusion = np.array([r["fusion_flops"] or 0 for r in rows], dtype=float) / 1e6
    right.barh(y, connector, color="#3d6fb0", label="connector")
    right.barh(y, fusion, left=connector, color="#3a8a46", label="decoder / fusion")
    right.set_xlabel("MFLOPs one image adds (matmuls)")
    right.legend(loc="lower right", fontsize=8)
    fig.suptitle("what each design costs per image")
    fig.tight_layout()
    return _finish(fig, show)


def _right_against_other(names, right_image, other_image, seconds, height_pad: float, xlabel: str,
                         seconds_label: str, title: str, annotate: bool = False, chance: float | None = None):
    """Bars per design: a score with the right image beside the same score with another scene's image (the gap is
    what the image is worth), and a step time beside them."""
    y = np.arange(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.55 * len(names) + height_pad), sharey=True,
                                      gridspec_kw={"width_ratios": [1.6, 1]})
    left.barh(y - 0.2, right_image, height=0.4, color="#3a8a46", label="right image")
    left.barh(y + 0.2, other_image, height=0.4, color="#bbbbbb", label="another scene's image")
    if annotate:
        for k, (a, b) in enumerate(zip(right_image, other_image)):
            left.text(a, k - 0.2, f" {a:.2f}", va="center", fontsize=8)
            left.text(b, k + 0.2, f" {b:.2f}", va="center", fontsize=8, color="#666666")
    if chance is not None:
        left.axvline(chance, color="#444444", linestyle=":", linewidth=1)
        left.text(chance, len(names) - 0.45, " chance", fontsize=8, color="#444444")
        left.set_xlim(0, 1.08)
    left.set_yticks(y, names)
    left.invert_yaxis()
    left.set_xlabel(xlabel)
    left.legend(loc="lower right", fontsize=8)
    right.barh(y, seconds, color="#c8671a")
    right.set_xlabel(seconds_label)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_design_results(results: list[dict], show: bool = True):
    """Per design, after the same short training: held-out answer loss with the right image and with another
    scene's image (the gap is what the image is worth), and the step time.

    results: [{"name", "eval_loss", "other_image_loss", "seconds_per_step"}, ...]."""
    fig = _right_against_other([r["name"] for r in results], [r["eval_loss"] for r in results],
                               [r["other_image_loss"] for r in results], [r["seconds_per_step"] for r in results],
                               1.6, "held-out answer loss (lower is better)", "seconds per training step",
                               "the same data, steps and recipe: what each design learned")
    return _finish(fig, show)


def plot_design_accuracy(results: list[dict], chance: float | None = None, show: bool = True):
    """Per design, after the same training: held-out accuracy with the right image and with another scene's image
    (a design that reads the picture falls towards chance with the wrong one), and the CPU seconds per step.

    results: benchmarks/bench_design_space.py's records ({"variant", "accuracy": {"mean"}, "other_image":
    {"mean"}, "cpu_s_per_step", "decoder_tokens"}), e.g. from assets/design_space/results.json."""
    fig = _right_against_other([f"{r['variant']} ({r['decoder_tokens']} tok)" for r in results],
                               [r["accuracy"]["mean"] for r in results], [r["other_image"]["mean"] for r in results],
                               [r["cpu_s_per_step"] for r in results], 1.8, "held-out accuracy (mean over subsets)",
                               "CPU seconds per training step (1 thread)",
                               "the same data, steps and recipe: which designs read the picture", annotate=True,
                               chance=chance)
    return _finish(fig, show)
