"""Lesson 07, Jetson deployment: the memory budget and the decode roofline."""

from __future__ import annotations

from typing import Callable, Iterable

import matplotlib.pyplot as plt
import numpy as np

from .common import _finish


def plot_memory_budget(budgets: dict[str, dict[str, float]], usable_bytes: float, device: str = "",
                       show: bool = True):
    """Stacked bars of inference memory, one bar per configuration, against a device's usable memory.

    `budgets`: {"bar label": {"weights": bytes, "KV cache": bytes, ...}}; parts are stacked in the order they
    first appear. The red line is `usable_bytes` (e.g. ~5.2 GB on an 8 GB Jetson Orin Nano).
    """
    labels = list(budgets)
    parts = list(dict.fromkeys(part for budget in budgets.values() for part in budget))
    colours = plt.cm.Set2(np.linspace(0, 1, max(len(parts), 3)))
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(labels) + 1.8))
    left = np.zeros(len(labels))
    for part, colour in zip(parts, colours):
        values = np.array([budgets[label].get(part, 0.0) for label in labels]) / 1e9
        ax.barh(labels, values, left=left, color=colour, label=part)
        left += values
    for y, total in enumerate(left):
        ax.text(total, y, f" {total:.2f} GB", va="center", fontsize=8)
    ax.axvline(usable_bytes / 1e9, color="tab:red", ls="--", label=f"usable on {device or 'the device'}")
    ax.invert_yaxis()
    ax.set_xlabel("GB (10^9 bytes)")
    ax.set_xlim(0, max(left.max(), usable_bytes / 1e9) * 1.18)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("inference memory against the device's usable memory")
    return _finish(fig, show)


def plot_decode_roofline(lines: dict[str, Callable[[int], float]], contexts: Iterable[int],
                         measured: dict[str, tuple[int, float]] | None = None, show: bool = True):
    """Decode speed limit against context length (log scale), one line per setting.

    `lines`: {"label": f(context) -> tokens/s}, e.g. the learner's `decode_tokens_per_second` with a device's
    bandwidth and a weight format fixed. `measured`: {"label": (context, tokens/s)} drawn as stars.
    """
    contexts = list(contexts)
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for label, fn in lines.items():
        ax.plot(contexts, [fn(c) for c in contexts], marker=".", label=label)
    for label, (context, speed) in (measured or {}).items():
        ax.plot([context], [speed], "*", markersize=12, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [f"{c:,}" for c in contexts])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("tokens in the KV cache (context)")
    ax.set_ylabel("tokens / s")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("decode is memory-bound: tokens/s ~ bandwidth / bytes read per token")
    return _finish(fig, show)
