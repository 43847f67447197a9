"""Lesson 05, training with QLoRA: which tokens are trained, the rows, NF4 levels, loss curves."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from .common import _finish


def plot_token_labels(tokens: list[str], labels, attention_mask=None, per_row: int = 12, title: str | None = None,
                      show: bool = True):
    """One training sequence as a strip of token boxes: green = trained (its label is kept), grey = prompt
    (label -100), white = padding (attention_mask 0). Runs of <image> tokens are drawn as one box "<image> xN".

    `tokens`: the decoded tokens (one string each); `labels`: the same length, -100 where not trained.
    """
    labels = [int(x) for x in (labels.tolist() if isinstance(labels, torch.Tensor) else labels)]
    mask = [1] * len(tokens) if attention_mask is None else [int(x) for x in (
        attention_mask.tolist() if isinstance(attention_mask, torch.Tensor) else attention_mask)]
    boxes = []  # [text, kind, count]: a run of <image> tokens is one box
    for token, label, real in zip(tokens, labels, mask):
        kind = "pad" if not real else ("trained" if label != -100 else "prompt")
        if boxes and token == "<image>" and boxes[-1][0] == token and boxes[-1][1] == kind:
            boxes[-1][2] += 1
            continue
        boxes.append([token, kind, 1])
    colours = {"trained": "#8fd18f", "prompt": "#d9d9d9", "pad": "#ffffff"}
    rows = (len(boxes) + per_row - 1) // per_row
    fig, ax = plt.subplots(figsize=(per_row * 0.95, rows * 0.42 + 0.6))
    for i, (text, kind, count) in enumerate(boxes):
        r, c = divmod(i, per_row)
        ax.add_patch(plt.Rectangle((c, -r), 0.96, 0.85, facecolor=colours[kind], edgecolor="#888888", lw=0.6))
        shown = text.replace("\n", "\\n").replace(" ", "·")
        shown = shown if len(shown) <= 11 else shown[:10] + "…"
        shown = f"{shown} x{count}" if count > 1 else shown
        ax.text(c + 0.48, -r + 0.42, shown, ha="center", va="center", fontsize=7, family="DejaVu Sans Mono")
    ax.set_xlim(-0.1, per_row)
    ax.set_ylim(-rows + 0.8, 1.0)
    ax.set_axis_off()
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=colours[k], edgecolor="#888888") for k in colours]
    ax.legend(handles, ["trained (label = token)", "prompt (label -100)", "padding (label -100, mask 0)"],
              loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=9, pad=22)
    return _finish(fig, show)


def show_rows(rows: list[dict], ncols: int = 6, show: bool = True):
    """the_cauldron-style rows as a gallery: each row's first image with its questions and answers."""
    from ..data.synthetic import gallery

    fig = gallery(rows, ncols=ncols)  # a pyplot-free Figure: display it as a PNG
    if not show:
        return fig
    import io

    from IPython.display import Image, display

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    display(Image(data=buffer.getvalue()))
    return None


def plot_nf4_levels(levels, weights: torch.Tensor | None = None, block_size: int = 64, show: bool = True):
    """The 16 NF4 levels against 16 evenly spaced (int4) levels, over the histogram of a weight's values
    divided by their block's absmax (what the levels have to cover)."""
    levels = torch.as_tensor(levels, dtype=torch.float32)
    fig, ax = plt.subplots(figsize=(8, 3.4))
    if weights is not None:
        blocks = weights.detach().float().reshape(-1, block_size)
        scaled = (blocks / blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)).flatten()
        ax.hist(scaled.numpy(), bins=120, range=(-1, 1), color="#c6dbef", density=True,
                label=f"weights / block absmax (blocks of {block_size})")
    top = ax.get_ylim()[1] if weights is not None else 1.0
    for i, level in enumerate(levels.tolist()):
        ax.axvline(level, ymin=0.5, ymax=1.0, color="tab:blue", lw=1.4, label="NF4 levels" if i == 0 else None)
    for i, level in enumerate(torch.linspace(-1, 1, len(levels)).tolist()):
        ax.axvline(level, ymin=0.0, ymax=0.45, color="tab:orange", lw=1.4, ls="--",
                   label="evenly spaced (int4)" if i == 0 else None)
    ax.set_ylim(0, top)
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("value / block absmax")
    ax.set_yticks([])
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("NF4 puts its 16 levels where normal weights are dense; int4 spaces them evenly")
    return _finish(fig, show)


def plot_loss_curves(curves: dict[str, list[float]], title: str = "training loss (answer tokens)",
                     ylabel: str = "cross-entropy", show: bool = True):
    """Several runs' per-step losses on one plot: {"label": [loss at step 1, 2, ...]}. A list of
    (step, loss) pairs is accepted too, for a run that starts later (a resumed one)."""
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    styles = [dict(lw=2.2, alpha=0.8), dict(lw=1.2, ls="--", marker="."), dict(lw=1.2, ls=":", marker="x")]
    for i, (label, values) in enumerate(curves.items()):
        values = list(values)
        if values and isinstance(values[0], (tuple, list)):
            steps, losses = zip(*values)
        else:
            steps, losses = range(1, len(values) + 1), values
        ax.plot(list(steps), list(losses), label=label, **styles[i % len(styles)])
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, show)
