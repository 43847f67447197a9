"""The course's architecture figures: drawn with matplotlib, stored as PNGs, shown in the lessons as cell attachments.

    python docs/figures/make_figures.py            write docs/figures/NAME.png for every figure that changed
    python docs/figures/make_figures.py --embed    also put them into the solution notebooks' markdown cells that
                                                   show them (![...](attachment:NAME.png)), then regenerate lessons/
    python docs/figures/make_figures.py --check    change nothing; exit 1 if a PNG or an attachment differs

A markdown cell shows a figure with `![what it shows](attachment:NAME.png)`; `--embed` copies the PNG into that
cell's attachments. Attachments render in JupyterLab, on GitHub and on Colab alike (a relative path to a file does
not render on Colab), and the lessons carry them like any other markdown.

The output is byte-identical from run to run: the Agg renderer, matplotlib's default settings (whatever the local
matplotlibrc says), a fixed size and dpi, the DejaVu fonts matplotlib ships, and a PNG written by Pillow with no
metadata (no software version, no date), reduced to a palette of at most COLOURS colours.
"""

from __future__ import annotations

import argparse
import base64
import io
import re
import sys
from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Rectangle

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DPI = 100
COLOURS = 128
ATTACHMENT = re.compile(r"!\[[^\]]*\]\(attachment:([A-Za-z0-9_.-]+\.png)\)")

# One colour per part of the model, used by every figure.
VISION, VISION_DARK = "#dbe7f5", "#3d6fb0"
PROJ, PROJ_DARK = "#fde3cc", "#c8671a"
TEXT, TEXT_DARK = "#dcefdc", "#3a8a46"
GREY, GREY_DARK = "#ececec", "#8a8a8a"
FROZEN, TRAINED = "#e4e4f0", "#fbd5d5"
RED, GREEN, BLUE, YELLOW = "#d9534f", "#4aa564", "#4a7fd0", "#e8b93c"
INK = "#222222"

FIGURES: dict[str, tuple[Callable[[], Figure], str]] = {}


def figure(name: str, alt: str):
    """Register a function that draws one figure (returns a Figure) under NAME.png, with its alt text."""

    def register(draw: Callable[[], Figure]):
        FIGURES[f"{name}.png"] = (draw, alt)
        return draw

    return register


# ----------------------------------------------------------------------------------------------
# Rendering


def _rc() -> dict:
    rc = {k: v for k, v in matplotlib.rcParamsDefault.items() if k not in ("backend", "backend_fallback")}
    rc.update({"font.family": "DejaVu Sans", "font.size": 10, "svg.hashsalt": "course", "path.simplify": True})
    return rc


def render(name: str) -> bytes:
    """The PNG bytes of one figure, the same on every run."""
    from PIL import Image

    draw, _ = FIGURES[name]
    with matplotlib.rc_context(_rc()):
        fig = draw()
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())
    image = Image.fromarray(rgba[..., :3].copy(), "RGB").quantize(COLOURS, dither=Image.Dither.NONE)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def new_figure(width: float, height: float) -> tuple[Figure, object]:
    """A figure of width x height inches and one axes covering it, in units of 1/10 inch, y pointing up."""
    fig = Figure(figsize=(width, height), dpi=DPI, facecolor="white")
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width * 10)
    ax.set_ylim(0, height * 10)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig, ax


# ----------------------------------------------------------------------------------------------
# Drawing helpers (coordinates in 1/10 inch)


def box(ax, x, y, w, h, text="", fc=GREY, ec=GREY_DARK, size=9.5, weight="normal", color=INK, lw=1.2,
        radius=0.8, ha="center", style="round", zorder=2, **kw):
    """A rounded box with its lower-left corner at (x, y) and centred text."""
    pad = min(radius, w / 4, h / 4)
    ax.add_patch(FancyBboxPatch((x + pad, y + pad), w - 2 * pad, h - 2 * pad, boxstyle=f"{style},pad={pad}",
                                fc=fc, ec=ec, lw=lw, zorder=zorder))
    if text:
        tx = x + w / 2 if ha == "center" else x + 1.2
        ax.text(tx, y + h / 2, text, ha=ha, va="center", fontsize=size, weight=weight, color=color,
                zorder=zorder + 1, linespacing=1.25, **kw)


def rect(ax, x, y, w, h, fc, ec="white", lw=0.8, zorder=2, **kw):
    ax.add_patch(Rectangle((x, y), w, h, fc=fc, ec=ec, lw=lw, zorder=zorder, **kw))


def arrow(ax, start, end, color=INK, lw=1.4, style="-|>", scale=11, rad=0.0, zorder=3, ls="-"):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=scale, color=color, lw=lw,
                                 connectionstyle=f"arc3,rad={rad}", zorder=zorder, shrinkA=0, shrinkB=0, ls=ls))


def label(ax, x, y, text, size=9.5, color=INK, ha="center", va="center", weight="normal", **kw):
    ax.text(x, y, text, ha=ha, va=va, fontsize=size, color=color, weight=weight, linespacing=1.3, **kw)


def title(ax, fig, text, size=12):
    w, h = fig.get_size_inches()
    ax.text(2, h * 10 - 2.2, text, ha="left", va="center", fontsize=size, weight="bold", color=INK)


def plus(ax, x, y, r=1.3, fc="white", ec=INK):
    """A residual sum: a circle with a plus."""
    ax.add_patch(Circle((x, y), r, fc=fc, ec=ec, lw=1.3, zorder=4))
    ax.plot([x - r * 0.6, x + r * 0.6], [y, y], color=ec, lw=1.3, zorder=5)
    ax.plot([x, x], [y - r * 0.6, y + r * 0.6], color=ec, lw=1.3, zorder=5)


def times(ax, x, y, r=1.3, fc="white", ec=INK):
    """An elementwise product: a circle with a cross."""
    ax.add_patch(Circle((x, y), r, fc=fc, ec=ec, lw=1.3, zorder=4))
    d = r * 0.45
    ax.plot([x - d, x + d], [y - d, y + d], color=ec, lw=1.3, zorder=5)
    ax.plot([x - d, x + d], [y + d, y - d], color=ec, lw=1.3, zorder=5)


def brace(ax, x0, x1, y, text, size=9, color=INK, down=True):
    """A bracket under (or over) the span x0..x1 at height y, with text beyond it."""
    d = -1.0 if down else 1.0
    ax.plot([x0, x0, x1, x1], [y - d * 0.0, y + d * 0.8, y + d * 0.8, y], color=color, lw=1.0)
    label(ax, (x0 + x1) / 2, y + d * 2.2, text, size=size, color=color)


def mix(colour: str, amount: float) -> tuple:
    """colour mixed with white (amount 0: the colour, 1: white)."""
    rgb = np.array(matplotlib.colors.to_rgb(colour))
    return tuple(rgb + (1 - rgb) * amount)


# ----------------------------------------------------------------------------------------------
# A small synthetic picture, the same in every figure that shows an image


def toy_image(size: int = 64) -> np.ndarray:
    """An (H, W, 3) float picture: a red circle, a blue square and a yellow triangle on a light background."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.ones((size, size, 3)) * np.array([0.93, 0.95, 0.98])
    img[(yy > 0.72)] = np.array([0.80, 0.90, 0.78])  # grass
    circle = (xx - 0.27) ** 2 + (yy - 0.3) ** 2 < 0.17 ** 2
    img[circle] = matplotlib.colors.to_rgb(RED)
    square = (xx > 0.58) & (xx < 0.88) & (yy > 0.12) & (yy < 0.42)
    img[square] = matplotlib.colors.to_rgb(BLUE)
    triangle = (yy > 0.5) & (yy < 0.9) & (np.abs(xx - 0.62) < (yy - 0.5) * 0.55)
    img[triangle] = matplotlib.colors.to_rgb(YELLOW)
    return img


def image(ax, array, x, y, w, h, **kw):
    """imshow into the box (x, y, w, h) without changing the axes' limits."""
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    ax.imshow(array, extent=(x, x + w, y, y + h), interpolation="nearest", zorder=2, **kw)
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)


# ----------------------------------------------------------------------------------------------
# Lesson 00: the whole course


@figure("pipeline", "The whole model with nanoVLM's sizes, and the lesson that builds each part: an image through the "
                    "processor, the ViT and the projector into 49 image tokens, the question through the chat "
                    "template, both spliced into one sequence of embeddings, the decoder writing the answer; then "
                    "training, evaluation and deployment")
def pipeline_figure() -> Figure:
    fig, ax = new_figure(10, 4.1)
    title(ax, fig, "the course in one picture: nanoVLM's sizes, and the lesson that builds each part")
    image(ax, toy_image(64), 2.0, 21.0, 9.0, 9.0)
    label(ax, 6.5, 19.2, "image", size=8.5)
    top = [(14.0, 13.0, "processor", "resize, normalise\n(1, 3, 224, 224)", GREY, "04"),
           (30.0, 13.0, "ViT (SigLIP)", "196 patches\n(1, 196, 768)", VISION, "01"),
           (46.0, 13.0, "projector", "pixel shuffle + linear\n(1, 49, 576)", PROJ, "02")]
    for x, w, head, body, colour, lesson in top:
        box(ax, x, 20.0, w, 11.0, "", fc=colour, ec=GREY_DARK)
        label(ax, x + w / 2, 28.3, head, size=9, weight="bold")
        label(ax, x + w / 2, 24.0, body, size=8.0)
        label(ax, x + w / 2, 33.0, f"lesson {lesson}", size=8.3, color=GREY_DARK)
    for xa, xb in [(11.5, 13.8), (27.2, 29.8), (43.2, 45.8)]:
        arrow(ax, (xa, 25.5), (xb, 25.5))
    label(ax, 1.5, 12.0, "\"What\nshapes do\nyou see?\"", size=8.3, ha="left")
    box(ax, 14.0, 7.5, 45.0, 9.0, "", fc=TEXT, ec=GREY_DARK)
    label(ax, 36.5, 14.2, "chat template with 49 <image> slots → token ids (1, T)", size=8.6, weight="bold")
    label(ax, 36.5, 10.2, "<|im_start|>user⏎<image>…<image>What shapes do you see?<|im_end|>⏎\n"
          "<|im_start|>assistant⏎", size=7.6)
    label(ax, 36.5, 5.6, "lesson 04", size=8.3, color=GREY_DARK)
    arrow(ax, (12.5, 12.0), (13.8, 12.0))
    box(ax, 63.0, 13.0, 14.0, 12.0, "", fc=mix(PROJ_DARK, 0.8), ec=GREY_DARK)
    label(ax, 70.0, 21.8, "splice", size=9, weight="bold")
    label(ax, 70.0, 17.2, "image tokens over\nthe <image> slots\n(1, T, 576)", size=8.0)
    label(ax, 70.0, 27.0, "lesson 04", size=8.3, color=GREY_DARK)
    arrow(ax, (59.2, 25.5), (63.0, 22.0))
    arrow(ax, (59.2, 12.0), (63.0, 16.0))
    box(ax, 80.5, 13.0, 12.5, 12.0, "", fc=TEXT, ec=GREY_DARK)
    label(ax, 86.75, 21.8, "decoder", size=9, weight="bold")
    label(ax, 86.75, 17.2, "SmolLM2-135M\nlogits\n(1, T, 49,152)", size=8.0)
    label(ax, 86.75, 27.0, "lesson 03", size=8.3, color=GREY_DARK)
    arrow(ax, (77.2, 19.0), (80.3, 19.0))
    arrow(ax, (93.2, 19.0), (95.5, 19.0))
    label(ax, 96.0, 15.0, "answer,\ntoken by\ntoken", size=8.0, ha="center", va="top")
    ax.add_patch(FancyBboxPatch((2.2, 0.8), 95.6, 3.2, boxstyle="round,pad=0.3", fc="#fafafa", ec=GREY, lw=1.0))
    label(ax, 50, 2.4, "then: lesson 05 trains it (QLoRA)   ·   lesson 06 measures it   ·   lesson 07 takes it to a "
          "Jetson Orin Nano", size=8.8)
    return fig


# ----------------------------------------------------------------------------------------------
# Lesson 01: the ViT


@figure("patchify", "An image cut into a 4 x 4 grid of patches, numbered row by row, laid out as a sequence of 16 "
                    "patch vectors; one patch vector holds its red, then green, then blue p x p values")
def patchify_figure() -> Figure:
    fig, ax = new_figure(10, 4.2)
    title(ax, fig, "patchify: an image becomes a sequence of patch vectors")
    img, p = toy_image(64), 16
    x0, y0, side = 2.5, 6.5, 26
    image(ax, img, x0, y0, side, side)
    step = side / 4
    for k in range(5):
        ax.plot([x0 + k * step] * 2, [y0, y0 + side], color="white", lw=2.2, zorder=3)
        ax.plot([x0, x0 + side], [y0 + k * step] * 2, color="white", lw=2.2, zorder=3)
    for i in range(16):
        row, col = divmod(i, 4)
        label(ax, x0 + (col + 0.5) * step, y0 + side - (row + 0.5) * step, str(i), size=9, weight="bold",
              bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85), zorder=4)
    label(ax, x0 + side / 2, y0 - 2.6, "image (C, H, W) = (3, 64, 64), patch p = 16:\na 4 x 4 grid, read row by row",
          size=9)
    arrow(ax, (x0 + side + 1.5, 27), (35.5, 27))
    label(ax, 32, 29.2, "patchify", size=9.5, weight="bold")
    # the sequence of patches
    tile, gap, sx, sy = 3.1, 0.75, 36.0, 24.5
    row_colours = [RED, GREEN, BLUE, PROJ_DARK]
    for i in range(16):
        row, col = divmod(i, 4)
        x = sx + i * (tile + gap)
        image(ax, img[row * p:(row + 1) * p, col * p:(col + 1) * p], x, sy, tile, tile)
        rect(ax, x - 0.3, sy - 0.3, tile + 0.6, tile + 0.6, fc="none", ec=row_colours[row], lw=1.6, zorder=3)
        label(ax, x + tile / 2, sy - 1.4, str(i), size=8.5)
    for row in range(4):
        xa = sx + row * 4 * (tile + gap)
        xb = xa + 4 * tile + 3 * gap
        brace(ax, xa, xb, sy + tile + 0.6, f"grid row {row}", size=8.5, color=row_colours[row], down=False)
    label(ax, sx, 33.6, "a sequence of N = 16 patch vectors: patch number = row · (W/p) + column", size=9.5, ha="left")
    # one patch vector, channel by channel
    k = 6
    row, col = divmod(k, 4)
    kx = sx + k * (tile + gap)
    crop = img[row * p:(row + 1) * p, col * p:(col + 1) * p]
    bx, by, seg, h = 38.0, 6.5, 18.0, 7.5
    label(ax, bx, by + h + 3.4, f"patch {k} as one vector, laid out (C, p, p): all its red values, then green, then blue",
          size=9, ha="left")
    arrow(ax, (kx + tile / 2, sy - 2.6), (kx + tile / 2, by + h + 5.0), color=GREY_DARK, lw=1.1)
    for c, name in enumerate(["red", "green", "blue"]):
        x = bx + c * seg
        channel = np.zeros_like(crop)
        channel[..., c] = crop[..., c]
        rect(ax, x, by, seg, h, fc=mix([RED, GREEN, BLUE][c], 0.85), ec=GREY_DARK, lw=1.0)
        image(ax, channel, x + 0.6, by + 0.6, h - 1.2, h - 1.2)
        label(ax, x + h + 0.4, by + h / 2, f"{name}: p · p\n= 256 values", size=8.5, ha="left")
    brace(ax, bx, bx + 3 * seg, by - 0.3, "C · p · p = 3 · 16 · 16 = 768 numbers   (SigLIP-B/16 at 224 px: "
          "14 × 14 = 196 patches of 768)", size=9)
    label(ax, 98, 42 - 2.2, "(B, C, H, W) → (B, N, C·p·p),  N = (H/p)·(W/p)", size=10, ha="right", color=VISION_DARK)
    return fig


def matrix(ax, x, y, rows, cols, cell, fc=GREY, ec="white", highlight=None, hl=INK, lw=0.8):
    """A rows x cols grid of cells with its lower-left corner at (x, y); fc is a colour or a function (r, c) -> colour.
    highlight: a row to outline."""
    for r in range(rows):
        for c in range(cols):
            colour = fc(r, c) if callable(fc) else fc
            rect(ax, x + c * cell, y + (rows - 1 - r) * cell, cell, cell, fc=colour, ec=ec, lw=lw)
    if highlight is not None:
        rect(ax, x - 0.15, y + (rows - 1 - highlight) * cell - 0.15, cols * cell + 0.3, cell + 0.3, fc="none", ec=hl,
             lw=1.8, zorder=4)


@figure("attention", "Scaled dot-product attention for one head: scores Q K-transposed over root d, a softmax over "
                     "each query's row, a weighted sum of the values; then multi-head attention: the width split "
                     "into heads, attention in each head, the heads side by side again, out_proj")
def attention_figure() -> Figure:
    fig, ax = new_figure(10, 5.6)
    title(ax, fig, "attention: every query mixes the values of the keys it matches")
    rng = np.random.default_rng(3)
    n, d, c = 6, 4, 2.0
    scores = rng.normal(size=(n, n)) * 1.2
    weights = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    blues, oranges = matplotlib.colormaps["Blues"], matplotlib.colormaps["Oranges"]
    q_row, y, mid = 2, 34.0, 34.0 + n * c / 2
    label(ax, 2, 49.0, "one head: softmax(Q Kᵀ / √d) V", size=10, ha="left", weight="bold")
    matrix(ax, 3, y, n, d, c, fc=VISION, highlight=q_row)
    label(ax, 7, y - 2.0, "Q  (Nq, d)", size=9)
    label(ax, 12.5, mid, "·", size=18)
    matrix(ax, 14, y + (n - d) * c / 2, d, n, c, fc=PROJ)
    label(ax, 20, y - 2.0, "Kᵀ  (d, Nk)", size=9)
    arrow(ax, (27, mid), (32, mid))
    label(ax, 29.5, mid + 1.8, "/ √d", size=9.5)
    matrix(ax, 33, y, n, n, c, fc=lambda r, k: blues(0.12 + 0.75 * (scores[r, k] - scores.min()) / np.ptp(scores)),
           highlight=q_row)
    label(ax, 39, y - 2.0, "scores  (Nq, Nk)", size=9)
    arrow(ax, (46, mid), (52, mid))
    label(ax, 49, mid + 2.6, "softmax\nover keys", size=8.5)
    matrix(ax, 53, y, n, n, c, fc=lambda r, k: oranges(0.08 + 0.85 * weights[r, k] / weights.max()), highlight=q_row)
    label(ax, 59, y - 2.6, "weights  (Nq, Nk)\neach row sums to 1", size=9)
    label(ax, 66.5, mid, "·", size=18)
    matrix(ax, 68, y, n, d, c, fc=TEXT)
    label(ax, 72, y - 2.0, "V  (Nk, dv)", size=9)
    label(ax, 77.6, mid, "=", size=14)
    matrix(ax, 79, y, n, d, c, fc=lambda r, k: mix(TEXT_DARK, 0.4 if r == q_row else 0.75), highlight=q_row)
    label(ax, 83, y - 2.0, "output  (Nq, dv)", size=9)
    label(ax, 2, 28.3, "The outlined query: its scores against every key, its weights, its output (the values averaged "
          "with those weights).  ÷ √d: a dot product of d\nnumbers of variance 1 has variance d; dividing brings it "
          "back to 1, so that the softmax does not saturate.", size=8.6, ha="left", va="center", color=GREY_DARK)
    ax.plot([2, 98], [25.2, 25.2], color=GREY, lw=1.0)
    # multi-head
    label(ax, 2, 23.0, "multi-head: split the width D into h heads of D/h channels; each head attends on its own",
          size=10, ha="left", weight="bold")
    heads = [VISION_DARK, PROJ_DARK, TEXT_DARK]
    tints = [mix(h, 0.55) for h in heads]
    y2, mid2 = 5.0, 5.0 + n * c / 2
    matrix(ax, 3, y2, n, 6, c, fc=lambda r, k: tints[k // 2], highlight=q_row)
    for h in range(3):
        label(ax, 3 + (2 * h + 1) * c, y2 + n * c + 1.2, f"h{h}", size=8.5, color=heads[h], weight="bold")
    label(ax, 9, y2 - 2.0, "q_proj(x)  (B, N, D)", size=9)
    arrow(ax, (16, mid2), (28, mid2))
    label(ax, 22, mid2 + 2.6, "view (B, N, h, D/h)\ntranspose(1, 2)", size=8.5)
    for h in range(3):
        matrix(ax, 29 + h * 5.5, y2, n, 2, c, fc=tints[h], highlight=q_row, hl=heads[h])
        label(ax, 31 + h * 5.5, y2 + n * c + 1.2, f"head {h}", size=8.5, color=heads[h])
    label(ax, 36.5, y2 - 2.0, "(B, h, N, D/h)", size=9)
    arrow(ax, (46, mid2), (60, mid2))
    label(ax, 53, mid2 + 3.4, "attention in each head,\nthen transpose(1, 2),\nreshape (B, N, D)", size=8.5)
    matrix(ax, 61, y2, n, 6, c, fc=lambda r, k: mix(heads[k // 2], 0.3), highlight=q_row)
    label(ax, 67, y2 - 2.0, "heads side by side  (B, N, D)", size=9)
    arrow(ax, (74, mid2), (77, mid2))
    box(ax, 77.5, mid2 - 2.2, 9.5, 4.4, "out_proj", fc=GREY, size=9)
    arrow(ax, (87, mid2), (90, mid2))
    label(ax, 90.5, mid2, "(B, N, D)", size=9, ha="left")
    label(ax, 76.5, y2 + 1.6, "one row = one token, in every\nstep: the split cuts its channels", size=8.3,
          ha="left", color=GREY_DARK)
    return fig


@figure("vit_block", "The ViT: pixels, a patch embedding, position embeddings added, a stack of pre-LayerNorm blocks, "
                     "a final LayerNorm; one block: x plus attention of LayerNorm of x, then x plus the MLP "
                     "(fc1, GELU, fc2) of LayerNorm of x")
def vit_block_figure() -> Figure:
    fig, ax = new_figure(10, 4.3)
    title(ax, fig, "the ViT and its pre-LayerNorm block (SigLIP-B/16 sizes)")
    y = 34.0
    steps = [("pixels\n(B, 3, 224, 224)", GREY), ("patch embedding\nconv p × p, stride p\n= linear on patches", VISION),
             ("+ position\nembeddings\n(196 learned)", VISION), ("ViT block\n× 12", VISION_DARK),
             ("post\nLayerNorm", VISION), ("(B, 196, 768)", GREY)]
    widths = [13, 16, 13, 11, 10, 12]
    x = 3.0
    centres = []
    for (text, colour), w in zip(steps, widths):
        dark = colour == VISION_DARK
        box(ax, x, y - 3.6, w, 7.6, text, fc=colour if not dark else mix(VISION_DARK, 0.25),
            ec=VISION_DARK, size=8.8, color="white" if dark else INK, weight="bold" if dark else "normal")
        centres.append((x, x + w))
        x += w + 4.0
        if x < 95:
            arrow(ax, (x - 3.6, y + 0.2), (x - 0.4, y + 0.2))
    bx0, bx1 = centres[3]
    # the block, expanded
    ax.plot([bx0, 2.5], [y - 3.8, 25.5], color=VISION_DARK, lw=1.0, ls="--")
    ax.plot([bx1, 97.5], [y - 3.8, 25.5], color=VISION_DARK, lw=1.0, ls="--")
    ax.add_patch(FancyBboxPatch((2.5, 1.5), 95, 24, boxstyle="round,pad=0.4", fc="#f6f9fd", ec=VISION_DARK, lw=1.0))
    ry = 20.5
    arrow(ax, (4, ry), (96, ry), lw=2.0)
    label(ax, 5, ry + 1.6, "x  (B, N, D)  the residual stream", size=8.8, ha="left")
    ax.plot([9, 9], [ry, 9], color=INK, lw=1.4)
    arrow(ax, (9, 9), (12, 9))
    box(ax, 12, 6.5, 11, 5, "layer_norm1", fc=VISION, ec=VISION_DARK, size=8.8)
    arrow(ax, (23, 9), (26, 9))
    box(ax, 26, 6.5, 16, 5, "multi-head\nattention", fc=mix(VISION_DARK, 0.55), ec=VISION_DARK, size=8.8)
    ax.plot([42, 46], [9, 9], color=INK, lw=1.4)
    arrow(ax, (46, 9), (46, ry - 1.3))
    plus(ax, 46, ry)
    label(ax, 25, 3.6, "x = x + attention(layer_norm1(x))", size=8.8, color=VISION_DARK)
    ax.plot([51, 51], [ry, 9], color=INK, lw=1.4)
    arrow(ax, (51, 9), (53.5, 9))
    box(ax, 53.5, 6.5, 10.5, 5, "layer_norm2", fc=VISION, ec=VISION_DARK, size=8.8)
    arrow(ax, (64, 9), (66, 9))
    box(ax, 66, 6.5, 7.5, 5, "fc1\nD → 4D", fc=mix(VISION_DARK, 0.55), ec=VISION_DARK, size=8.5)
    arrow(ax, (73.5, 9), (75.5, 9))
    box(ax, 75.5, 6.5, 7.5, 5, "GELU\n(tanh)", fc=VISION, ec=VISION_DARK, size=8.5)
    arrow(ax, (83, 9), (85, 9))
    box(ax, 85, 6.5, 7.5, 5, "fc2\n4D → D", fc=mix(VISION_DARK, 0.55), ec=VISION_DARK, size=8.5)
    ax.plot([92.5, 93.5], [9, 9], color=INK, lw=1.4)
    arrow(ax, (93.5, 9), (93.5, ry - 1.3))
    plus(ax, 93.5, ry)
    label(ax, 73, 3.6, "x = x + fc2(gelu(fc1(layer_norm2(x))))", size=8.8, color=VISION_DARK)
    label(ax, 53, ry - 3.4, "D = 768, 4D = 3072, N = 196. The norms sit in the branches:\n"
          "the residual stream itself is never normalised (pre-LN)", size=8.5, ha="left", va="center",
          color=GREY_DARK)
    return fig


# ----------------------------------------------------------------------------------------------
# Lesson 02: the projector

BLOCK_COLOURS = [VISION_DARK, PROJ_DARK, TEXT_DARK, "#8a5fb5"]


@figure("pixel_shuffle", "A 4 x 4 grid of patch vectors cut into 2 x 2 blocks; each block's four patch vectors, read "
                         "row by row, are concatenated into one token of width 4D; one linear layer then maps each "
                         "token to the decoder's width")
def pixel_shuffle_figure() -> Figure:
    fig, ax = new_figure(10, 3.2)
    title(ax, fig, "pixel shuffle (r = 2), then one linear layer: the projector")
    c, gx, gy = 4.2, 3.0, 5.0
    for i in range(16):
        row, col = divmod(i, 4)
        block = (row // 2) * 2 + col // 2
        shade = 0.35 + 0.15 * ((row % 2) * 2 + col % 2)
        rect(ax, gx + col * c, gy + (3 - row) * c, c, c, fc=mix(BLOCK_COLOURS[block], shade), ec="white", lw=2)
        label(ax, gx + (col + 0.5) * c, gy + (3.5 - row) * c, str(i), size=9.5, weight="bold")
    for b in range(4):
        br, bc = divmod(b, 2)
        rect(ax, gx + bc * 2 * c, gy + (1 - br) * 2 * c, 2 * c, 2 * c, fc="none", ec=BLOCK_COLOURS[b], lw=2.2,
             zorder=4)
    label(ax, gx + 2 * c, gy - 2.4, "16 patch vectors of width D\non their 4 × 4 grid: (B, 16, D)", size=9)
    arrow(ax, (22.5, gy + 2 * c), (29.5, gy + 2 * c))
    label(ax, 26.0, gy + 2 * c + 2.6, "pixel shuffle\nr = 2", size=9, weight="bold")
    # tokens of width 4D
    tx, tw, th = 38.0, 5.6, 3.2
    for t in range(4):
        br, bc = divmod(t, 2)
        members = [(2 * br + dr) * 4 + 2 * bc + dc for dr in range(2) for dc in range(2)]
        y = gy + (3 - t) * 4.2 + 0.5
        label(ax, tx - 0.8, y + th / 2, f"token {t}", size=8.5, ha="right", color=BLOCK_COLOURS[t])
        for slot, patch in enumerate(members):
            shade = 0.35 + 0.15 * slot
            rect(ax, tx + 2.5 + slot * tw, y, tw, th, fc=mix(BLOCK_COLOURS[t], shade), ec="white", lw=1.5)
            label(ax, tx + 2.5 + (slot + 0.5) * tw, y + th / 2, str(patch), size=9, weight="bold")
    label(ax, tx + 2.5 + 2 * tw, gy - 2.4, "4 tokens of width 4 · D: (B, 4, 4D)\neach a block's patches, row by row",
          size=9)
    arrow(ax, (64.5, gy + 2 * c), (73, gy + 2 * c))
    label(ax, 68.7, gy + 2 * c + 2.6, "linear\n4D → D_text", size=9, weight="bold")
    for t in range(4):
        y = gy + (3 - t) * 4.2 + 0.5
        rect(ax, 74, y, 9, th, fc=mix(TEXT_DARK, 0.45), ec="white", lw=1.5)
        label(ax, 78.5, y + th / 2, f"token {t}", size=8.5)
    label(ax, 78.5, gy - 2.4, "(B, 4, D_text):\nthe decoder's width", size=9)
    label(ax, 86.5, 25.0, "nanoVLM:", size=9, ha="left", weight="bold", color=PROJ_DARK)
    label(ax, 86.5, 22.2, "196 × 768", size=9, ha="left")
    label(ax, 86.5, 19.5, "→ 49 × 3072", size=9, ha="left")
    label(ax, 86.5, 16.8, "→ 49 × 576", size=9, ha="left")
    label(ax, 86.5, 13.0, "no bias, no\nactivation:\n3072 · 576 =\n1.77M weights", size=8.5, ha="left",
          va="top", color=GREY_DARK)
    return fig


def _grid(ax, x, y, side, n, fc, ec="white", lw=0.5):
    cell = side / n
    rect(ax, x, y, side, side, fc=fc, ec="none")
    for k in range(n + 1):
        ax.plot([x + k * cell] * 2, [y, y + side], color=ec, lw=lw, zorder=3)
        ax.plot([x, x + side], [y + k * cell] * 2, color=ec, lw=lw, zorder=3)


@figure("token_budget", "Two token budgets: nanoVLM's 224 px image gives a 14 x 14 grid of patches, "
                        "folded by r = 2 into 7 x 7 = 49 tokens; SmolVLM-256M's 512 px tile gives 32 x 32 patches, "
                        "folded by r = 4 into 8 x 8 = 64 tokens")
def token_budget_figure() -> Figure:
    fig, ax = new_figure(10, 4.4)
    title(ax, fig, "the token budget: (size // p)² patches, divided by r²")
    rows = [("nanoVLM", "224 px image", 224, 16, 2, 14.0), ("SmolVLM-256M", "512 px tile", 512, 16, 4, 14.0)]
    for k, (name, what, size, p, r, side) in enumerate(rows):
        y = 23.5 - k * 20.0
        label(ax, 2, y + side / 2, name, size=10, ha="left", weight="bold")
        image(ax, toy_image(64), 17, y, side, side)
        label(ax, 17 + side / 2, y - 1.8, what, size=8.8)
        arrow(ax, (32.5, y + side / 2), (37.5, y + side / 2))
        label(ax, 35, y + side / 2 + 1.8, f"p = {p}", size=8.5)
        grid = size // p
        _grid(ax, 38.5, y, side, grid, VISION, ec=VISION_DARK, lw=0.35)
        label(ax, 38.5 + side / 2, y - 1.8, f"{grid} × {grid} = {grid * grid} patches", size=8.8)
        arrow(ax, (54, y + side / 2), (60, y + side / 2))
        label(ax, 57, y + side / 2 + 1.8, f"r = {r}", size=8.5)
        tokens = grid // r
        _grid(ax, 61, y, side, tokens, PROJ, ec=PROJ_DARK, lw=0.8)
        label(ax, 61 + side / 2, y - 1.8, f"{tokens} × {tokens} = {tokens * tokens} tokens", size=8.8)
        arrow(ax, (76.5, y + side / 2), (80, y + side / 2))
        text = (f"{tokens * tokens} image tokens\nin the decoder's input,\nnext to the text" if k == 0 else
                f"{tokens * tokens} tokens per tile\n(a big image is cut\ninto several tiles)")
        label(ax, 81, y + side / 2, text, size=8.8, ha="left")
    ax.plot([2, 98], [21.0, 21.0], color=GREY, lw=1.0)
    return fig


# ----------------------------------------------------------------------------------------------
# Lesson 03: the decoder


@figure("decoder_block", "SmolLM2-135M: token ids, embeddings, 30 decoder blocks, a final RMSNorm and the tied LM head; "
                         "one block: RMSNorm, q/k/v projections (9 query heads, 3 key/value heads), RoPE on q and k, "
                         "causal grouped-query attention, o_proj, residual; RMSNorm, the SwiGLU MLP, residual")
def decoder_block_figure() -> Figure:
    fig, ax = new_figure(10, 5.4)
    title(ax, fig, "the decoder: a Llama block with RoPE and grouped-query attention (SmolLM2-135M sizes)")
    column = [("token ids (B, T)", GREY), ("embed_tokens\n49,152 × 576", TEXT), ("decoder block\n× 30", TEXT_DARK),
              ("RMSNorm", TEXT), ("lm_head = embed_tokens\n(tied weights)", TEXT), ("logits (B, T, 49,152)", GREY)]
    for k, (text, colour) in enumerate(column):
        y = 42.0 - k * 7.6
        dark = colour == TEXT_DARK
        box(ax, 2, y - 2.6, 21, 5.4, text, fc=mix(TEXT_DARK, 0.2) if dark else colour, ec=TEXT_DARK, size=8.8,
            color="white" if dark else INK, weight="bold" if dark else "normal")
        if k < len(column) - 1:
            arrow(ax, (12.5, y - 2.7), (12.5, y - 4.9))
    block_y = 42.0 - 2 * 7.6
    ax.plot([23, 27], [block_y + 2.7, 46.5], color=TEXT_DARK, lw=1.0, ls="--")
    ax.plot([23, 27], [block_y - 2.7, 1.5], color=TEXT_DARK, lw=1.0, ls="--")
    ax.add_patch(FancyBboxPatch((27, 1.5), 70.5, 45, boxstyle="round,pad=0.4", fc="#f7fbf7", ec=TEXT_DARK, lw=1.0))
    sx = 31.0
    arrow(ax, (sx, 46.0), (sx, 2.5), lw=2.0)
    label(ax, sx - 1.2, 44.0, "x (B, T, 576)", size=8.5, ha="right", rotation=90, va="top")
    # attention branch
    ay = 36.0
    ax.plot([sx, 34], [ay, ay], color=INK, lw=1.4)
    box(ax, 34, ay - 2.5, 8.5, 5, "RMSNorm", fc=TEXT, ec=TEXT_DARK, size=8.5)
    projections = [("q_proj → 9 heads × 64", 40.0), ("k_proj → 3 heads × 64", 36.0), ("v_proj → 3 heads × 64", 32.0)]
    for text, y in projections:
        arrow(ax, (42.5, ay), (45.5, y), lw=1.0, scale=8)
        box(ax, 45.5, y - 1.6, 15.5, 3.2, text, fc=mix(TEXT_DARK, 0.55), ec=TEXT_DARK, size=8.0, radius=0.5)
    box(ax, 63.0, 34.3, 6.0, 7.4, "RoPE", fc=PROJ, ec=PROJ_DARK, size=8.5)
    for y in (40.0, 36.0):
        ax.plot([61, 63], [y, y], color=INK, lw=1.2)
        arrow(ax, (69, y), (72, y), lw=1.2, scale=8)
    arrow(ax, (61, 32.0), (72, 32.0), lw=1.2, scale=8)
    # grouped-query attention pictogram
    ax.add_patch(FancyBboxPatch((72.3, 29.3), 14.4, 13.4, boxstyle="round,pad=0.3", fc="white", ec=TEXT_DARK, lw=1.2))
    label(ax, 79.5, 41.3, "causal attention", size=8.3, weight="bold")
    label(ax, 79.5, 39.2, "9 query heads", size=7.5, color=GREY_DARK)
    groups = [VISION_DARK, PROJ_DARK, "#8a5fb5"]
    for h in range(9):
        x = 72.9 + h * 1.47
        rect(ax, x, 36.3, 1.15, 1.6, fc=mix(groups[h // 3], 0.35), ec="none")
        ax.plot([x + 0.57, 74.6 + (h // 3) * 4.4 + 0.9], [36.3, 33.9], color=groups[h // 3], lw=0.8)
    for g in range(3):
        rect(ax, 74.6 + g * 4.4, 32.2, 1.8, 1.7, fc=groups[g], ec="none")
    label(ax, 79.5, 30.7, "share 3 k/v heads", size=7.5, color=GREY_DARK)
    arrow(ax, (87.0, 36.0), (89.0, 36.0))
    box(ax, 89.0, ay - 2.5, 7.5, 5, "o_proj", fc=mix(TEXT_DARK, 0.55), ec=TEXT_DARK, size=8.5)
    ax.plot([92.75, 92.75], [ay - 2.5, 27.0], color=INK, lw=1.4)
    ax.plot([92.75, sx + 1.3], [27.0, 27.0], color=INK, lw=1.4)
    plus(ax, sx, 27.0)
    label(ax, 61, 25.2, "x = x + o_proj(attention(RoPE(q), RoPE(k), v))   (q, k, v from RMSNorm(x))", size=8.5,
          color=TEXT_DARK)
    # MLP branch
    my = 16.0
    ax.plot([sx, 34], [my, my], color=INK, lw=1.4)
    box(ax, 34, my - 2.5, 8.5, 5, "RMSNorm", fc=TEXT, ec=TEXT_DARK, size=8.5)
    for text, y in [("gate_proj 576 → 1536", my + 3.0), ("up_proj 576 → 1536", my - 3.0)]:
        arrow(ax, (42.5, my), (45.5, y), lw=1.0, scale=8)
        box(ax, 45.5, y - 1.6, 15.5, 3.2, text, fc=mix(TEXT_DARK, 0.55), ec=TEXT_DARK, size=8.0, radius=0.5)
    arrow(ax, (61, my + 3.0), (63.5, my + 3.0), lw=1.2, scale=8)
    box(ax, 63.5, my + 1.4, 6.5, 3.2, "SiLU", fc=TEXT, ec=TEXT_DARK, size=8.0, radius=0.5)
    ax.plot([70, 73, 73], [my + 3.0, my + 3.0, my + 1.3], color=INK, lw=1.2)
    ax.plot([61, 73, 73], [my - 3.0, my - 3.0, my - 1.3], color=INK, lw=1.2)
    times(ax, 73, my)
    arrow(ax, (74.3, my), (77.5, my))
    box(ax, 77.5, my - 2.5, 13.0, 5, "down_proj\n1536 → 576", fc=mix(TEXT_DARK, 0.55), ec=TEXT_DARK, size=8.3)
    ax.plot([90.5, 93.5, 93.5], [my, my, 7.0], color=INK, lw=1.4)
    ax.plot([93.5, sx + 1.3], [7.0, 7.0], color=INK, lw=1.4)
    plus(ax, sx, 7.0)
    label(ax, 61, 5.2, "x = x + down_proj(silu(gate_proj(h)) * up_proj(h)),  h = RMSNorm(x)   (SwiGLU)", size=8.5,
          color=TEXT_DARK)
    label(ax, 34, 22.0, "RoPE turns each (i, i + d/2) pair of q and k by position · θᵢ, so q·k depends on the distance;\n"
          "causal: a token attends to itself and the tokens before it only", size=8.0, ha="left", color=GREY_DARK)
    return fig


@figure("kv_cache", "Generation with a KV cache: the prompt's keys and values are computed once (prefill); each later "
                    "step feeds only the new token, appends its key and value to the cache and attends to everything "
                    "cached; the new token's position is the number of tokens already cached")
def kv_cache_figure() -> Figure:
    fig, ax = new_figure(10, 4.7)
    title(ax, fig, "the KV cache: each step feeds one new token and appends its keys and values")
    steps = [("prefill", "4 prompt tokens at once", 4, 0), ("decode step 1", "only the new token", 1, 4),
             ("decode step 2", "only the new token", 1, 5)]
    cw = 3.6
    label(ax, 31, 40.5, "tokens fed to the model", size=9, weight="bold")
    label(ax, 54, 40.5, "one layer's cache after the step: (B, kv_heads, T, head_dim)", size=9, weight="bold", ha="left")
    for k, (name, what, fed, first) in enumerate(steps):
        y = 33.0 - k * 11.5
        label(ax, 2, y + 1.2, name, size=9.5, ha="left", weight="bold")
        label(ax, 2, y - 1.4, what, size=8.5, ha="left", color=GREY_DARK)
        total = first + fed
        for t in range(6):
            x = 20 + t * (cw + 0.6)
            if t < first:
                rect(ax, x, y - 1.6, cw, 3.2, fc="white", ec=GREY, lw=1.0, ls="--")
                label(ax, x + cw / 2, y, f"t{t}", size=8.5, color=GREY)
            elif t < total:
                rect(ax, x, y - 1.6, cw, 3.2, fc=TEXT, ec=TEXT_DARK, lw=1.5)
                label(ax, x + cw / 2, y, f"t{t}", size=8.5, weight="bold")
        arrow(ax, (46.5, y), (50.0, y))
        for row, name2 in enumerate(["K", "V"]):
            yy = y + 0.4 - row * 3.4
            label(ax, 52.2, yy, name2, size=9, weight="bold")
            for t in range(total):
                new = t >= first
                rect(ax, 54 + t * cw, yy - 1.5, cw, 3.0, fc=mix(PROJ_DARK, 0.25) if new else PROJ,
                     ec="white", lw=1.5)
                label(ax, 54 + (t + 0.5) * cw, yy, str(t), size=8, color="white" if new else INK)
        note = ("cache.seq_len = 4" if k == 0 else
                f"position {first} = seq_len before the step\n(its RoPE angle); its query\nattends to keys 0-{first}")
        label(ax, 54 + 6 * cw + 1.5, y - 1.2, note, size=8.3, ha="left", color=GREY_DARK)
    label(ax, 2, 2.2, "update(layer, k, v) appends along the T axis (dim 2) and returns the whole cache. Without a cache, "
          "step n would run the model on all n tokens again.", size=8.5, ha="left")
    return fig


# ----------------------------------------------------------------------------------------------
# Lesson 04: assembling the VLM


def _token(ax, x, y, w, h, text, fc, ec, size=7.6, color=INK, weight="normal"):
    rect(ax, x, y, w, h, fc=fc, ec=ec, lw=1.0)
    label(ax, x + w / 2, y + h / 2, text, size=size, color=color, weight=weight)


@figure("splice", "Splicing: the prompt's token ids hold a block of <image> placeholders; text positions get their "
                  "token embeddings, and the image features from the ViT and projector are written over the "
                  "<image> positions, in order, giving one sequence of embeddings for the decoder")
def splice_figure() -> Figure:
    fig, ax = new_figure(10, 4.3)
    title(ax, fig, "splicing: image features written over the <image> positions of the text embeddings")
    tokens = ["<|im_start|>", "user", "⏎", *["<image>"] * 4, "What", " shapes", "?", "<|im_end|>", "⏎",
              "<|im_start|>", "assistant", "⏎"]
    w, x0 = 5.7, 12.5
    is_image = [t == "<image>" for t in tokens]
    label(ax, 2, 33.5, "input_ids\n(B, T)", size=8.8, ha="left")
    label(ax, 2, 19.5, "embeddings\n(B, T, D):\nthe decoder's\ninput", size=8.8, ha="left")
    label(ax, 2, 5.0, "image\nfeatures\n(N, P, D)", size=8.8, ha="left")
    for k, (text, image_slot) in enumerate(zip(tokens, is_image)):
        x = x0 + k * w
        _token(ax, x, 31.5, w - 0.3, 4.0, text, fc=PROJ if image_slot else TEXT,
               ec=PROJ_DARK if image_slot else TEXT_DARK, size=6.6 if len(text) > 7 else 7.8)
        colour = mix(PROJ_DARK, 0.25) if image_slot else mix(TEXT_DARK, 0.45)
        for j in range(5):
            rect(ax, x + 1.4, 15.0 + j * 1.8, w - 3.1, 1.8, fc=colour, ec="white", lw=0.8)
        if not image_slot:
            arrow(ax, (x + w / 2 - 0.15, 31.2), (x + w / 2 - 0.15, 24.4), color=TEXT_DARK, lw=1.0, scale=7)
    label(ax, x0 + 11 * w, 27.8, "text positions: embed_tokens(ids)", size=8.5, color=TEXT_DARK,
          bbox=dict(fc="white", ec="none", pad=1.5), zorder=6)
    label(ax, x0 + 5.0 * w, 27.8, "<image> positions: no lookup", size=8.5, color=PROJ_DARK)
    # the image side
    image(ax, toy_image(64), 12.5, 1.5, 7.5, 7.5)
    arrow(ax, (20.5, 5.2), (22.0, 5.2))
    box(ax, 22.2, 2.6, 4.2, 5.2, "", fc=VISION, ec=VISION_DARK)
    label(ax, 24.3, 10.6, "ViT +\nprojector", size=7.8)
    arrow(ax, (26.6, 5.2), (x0 + 3 * w + 1.2, 5.2))
    for k in range(4):
        x = x0 + (3 + k) * w
        for j in range(5):
            rect(ax, x + 1.4, 1.5 + j * 1.5, w - 3.1, 1.5, fc=mix(PROJ_DARK, 0.25), ec="white", lw=0.8)
        arrow(ax, (x + w / 2 - 0.15, 9.4), (x + w / 2 - 0.15, 14.6), color=PROJ_DARK, lw=1.2, scale=8)
    label(ax, x0 + 7 * w + 2.0, 5.5, "The i-th image's P features fill the i-th block of <image>\npositions, "
          "reading the batch row by row. In nanoVLM a block\nis 49 positions (4 drawn); the counts must match.",
          size=8.3, ha="left", color=PROJ_DARK)
    return fig


def _label_row(ax, tokens, labels, y, x0=2.0, w=6.3):
    for k, (text, trained) in enumerate(zip(tokens, labels)):
        x = x0 + k * w
        pad = text == "pad"
        fc = GREY if pad else (mix(TEXT_DARK, 0.3) if trained else "white")
        _token(ax, x, y, w - 0.3, 3.6, text, fc=fc, ec=TEXT_DARK if trained else GREY_DARK,
               color="white" if trained else INK, size=7.0 if len(text) > 8 else 7.8)
        label(ax, x + (w - 0.3) / 2, y - 2.0, text if trained else "-100", size=7.8,
              color=TEXT_DARK if trained else GREY_DARK, weight="bold" if trained else "normal")


@figure("answer_labels", "Answer-only labels on a two-turn conversation: every token is -100 except each assistant "
                         "answer and the <|im_end|> that closes it; the newline after it and the padding are -100 too")
def answer_labels_figure() -> Figure:
    fig, ax = new_figure(10, 3.9)
    title(ax, fig, "answer-only labels: train the answers and the <|im_end|> that closes each one")
    turn1 = ["<|im_start|>", "user", "⏎", "<image>", "<image>", "Colour", "?", "<|im_end|>", "⏎", "<|im_start|>",
             "assistant", "⏎", "red", "<|im_end|>", "⏎"]
    turn2 = ["<|im_start|>", "user", "⏎", "Shape", "?", "<|im_end|>", "⏎", "<|im_start|>", "assistant", "⏎",
             "circle", "<|im_end|>", "⏎", "pad", "pad"]
    trained1 = [False] * 12 + [True, True, False]
    trained2 = [False] * 10 + [True, True, False, False, False]
    label(ax, 2, 33.2, "tokens", size=8.5, ha="left", color=GREY_DARK)
    _label_row(ax, turn1, trained1, 27.0)
    label(ax, 2, 22.5, "tokens (continued)", size=8.5, ha="left", color=GREY_DARK)
    _label_row(ax, turn2, trained2, 16.3)
    label(ax, 2, 31.3, "", size=1)
    label(ax, 96.5, 11.6, "below each token: its label, -100 or (green) the token's own id", size=8.3, ha="right",
          color=GREY_DARK)
    ax.add_patch(FancyBboxPatch((2.2, 1.2), 95.6, 7.2, boxstyle="round,pad=0.3", fc="#fafafa", ec=GREY, lw=1.0))
    label(ax, 50, 4.8, "Labels are input_ids with -100 (IGNORE_INDEX) wherever the loss must not look: the prompt, "
          "the image, the newline after <|im_end|>,\nand the padding (attention_mask 0 there). They are not shifted: "
          "the loss scores position t's logits against label t + 1.", size=8.5)
    return fig


# ----------------------------------------------------------------------------------------------
# Lesson 05: QLoRA

NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)  # bitsandbytes' table, index = the 4-bit code


@figure("nf4", "NF4: a weight cut into blocks, one absmax per block; each value divided by its block's absmax and "
               "replaced by the code of the nearest of 16 levels placed at normal quantiles (code 7 is exactly 0); "
               "stored as 4-bit codes plus one fp32 absmax per block, 4.5 bits per weight")
def nf4_figure() -> Figure:
    fig, ax = new_figure(10, 4.5)
    title(ax, fig, "NF4: one scale per block, then the nearest of 16 normal-quantile levels")
    rng = np.random.default_rng(7)
    n_blocks, per = 4, 12
    values = rng.normal(0, 0.02, size=(n_blocks, per))
    values[2, 5] = 0.09  # an outlier: it only coarsens its own block
    absmax = np.abs(values).max(1)
    cmap = matplotlib.colormaps["RdBu_r"]
    cw, x0, y0 = 1.75, 4.0, 33.0
    label(ax, 2, 38.8, "the weight, flattened in memory order, cut into blocks (64 values each in QLoRA; 12 drawn)",
          size=9, ha="left")
    for b in range(n_blocks):
        bx = x0 + b * (per * cw + 2.6)
        for k in range(per):
            rect(ax, bx + k * cw, y0, cw, 3.2, fc=cmap(0.5 + values[b, k] / 0.2), ec="white", lw=0.6)
        rect(ax, bx - 0.2, y0 - 0.2, per * cw + 0.4, 3.6, fc="none", ec=PROJ_DARK if b == 0 else GREY_DARK,
             lw=1.6 if b == 0 else 1.0)
        note = {0: " (fp32)", 2: ": an outlier's"}.get(b, "")
        label(ax, bx + per * cw / 2, y0 - 1.9, f"block {b}: absmax {absmax[b]:.3f}{note}", size=8.3,
              color=PROJ_DARK if b == 0 else INK)
    # the number line
    lx0, lx1, ly = 8.0, 70.0, 14.0

    def at(v):
        return lx0 + (v + 1) / 2 * (lx1 - lx0)

    ax.plot([lx0, lx1], [ly, ly], color=INK, lw=1.2)
    for code, level in enumerate(NF4_LEVELS):
        ax.plot([at(level)] * 2, [ly - 1.0, ly + 1.0], color=INK if code != 7 else TEXT_DARK, lw=1.4)
        label(ax, at(level), ly - 2.4, str(code), size=8, color=TEXT_DARK if code == 7 else INK,
              weight="bold" if code == 7 else "normal")
    label(ax, at(-1), ly - 4.6, "-1", size=8, color=GREY_DARK)
    label(ax, at(0), ly - 4.6, "0 exactly", size=8, color=TEXT_DARK)
    label(ax, at(1), ly - 4.6, "1", size=8, color=GREY_DARK)
    label(ax, lx0 - 1.0, ly - 2.4, "code", size=8, ha="right", color=GREY_DARK)
    levels = np.array(NF4_LEVELS)
    for k, v in enumerate(values[0] / absmax[0]):
        nearest = levels[np.abs(levels - v).argmin()]
        y = ly + 3.0 + (k % 3) * 1.4
        ax.add_patch(Circle((at(v), y), 0.55, fc=cmap(0.5 + values[0, k] / 0.2), ec=INK, lw=0.6, zorder=5))
        arrow(ax, (at(v), y - 0.6), (at(nearest), ly + 1.1), color=GREY_DARK, lw=0.8, scale=6)
    label(ax, lx0, 25.6, "block 0 divided by its absmax (now in [-1, 1]); each value becomes the code of the "
          "nearest level:", size=8.6, ha="left", color=PROJ_DARK)
    label(ax, 39, 4.2, "16 levels at quantiles of a normal distribution: dense near 0, where trained weights are",
          size=8.3, color=GREY_DARK)
    box(ax, 74.5, 3.0, 23.3, 22.0, "", fc="#fafafa", ec=GREY)
    label(ax, 86.1, 22.6, "stored", size=9, weight="bold")
    label(ax, 86.1, 17.5, "a 4-bit code per weight\n+ one fp32 absmax\nper block of 64:\n4 + 32/64 = 4.5 bits",
          size=8.5)
    label(ax, 86.1, 10.6, "read back", size=9, weight="bold")
    label(ax, 86.1, 6.6, "level[code] × absmax\nof the code's block", size=8.5)
    return fig


@figure("lora", "LoRA: the input goes through the frozen weight W, and in parallel through dropout, A (r x in) and "
                "B (out x r, zero at the start), scaled by alpha over r; the two are added. On a 4-bit base it is QLoRA")
def lora_figure() -> Figure:
    fig, ax = new_figure(10, 3.9)
    title(ax, fig, "LoRA: a frozen weight plus a trainable low-rank update (QLoRA: the frozen weight in NF4)")
    ax.plot([6.0, 10.0], [18.5, 18.5], color=INK, lw=1.4)
    label(ax, 4.5, 18.5, "x", size=11, weight="bold")
    label(ax, 4.5, 15.8, "(…, in)", size=8, color=GREY_DARK)
    ax.plot([10.0, 10.0], [9.0, 28.0], color=INK, lw=1.4)
    arrow(ax, (10.0, 28.0), (21.0, 28.0))
    box(ax, 21.0, 22.0, 13.0, 12.0, "W\nout × in\nfrozen", fc=FROZEN, ec=GREY_DARK, size=9.5, radius=0.3,
        style="square")
    label(ax, 27.5, 20.2, "QLoRA: NF4 codes + absmax,\ndequantised at every call", size=8, color=GREY_DARK, va="top")
    ax.plot([34.0, 72.0], [28.0, 28.0], color=INK, lw=1.4)
    arrow(ax, (72.0, 28.0), (72.0, 20.0))
    arrow(ax, (10.0, 9.0), (15.0, 9.0))
    box(ax, 15.0, 6.5, 9.0, 5.0, "dropout", fc=GREY, ec=GREY_DARK, size=8.5)
    arrow(ax, (24.0, 9.0), (27.0, 9.0))
    box(ax, 27.0, 7.6, 13.0, 2.8, "A  r × in", fc=TRAINED, ec=RED, size=8.5, radius=0.3, style="square")
    label(ax, 33.5, 5.2, "random (Kaiming) init", size=8, color=RED)
    arrow(ax, (40.0, 9.0), (44.0, 9.0))
    box(ax, 44.0, 3.0, 2.8, 12.0, "", fc=TRAINED, ec=RED, radius=0.3, style="square")
    label(ax, 45.4, 9.0, "B", size=8.5)
    label(ax, 48.0, 13.2, "B  out × r\nzero at init", size=8, color=RED, ha="left")
    arrow(ax, (46.8, 9.0), (58.0, 9.0))
    box(ax, 58.0, 6.5, 8.0, 5.0, "× α / r", fc=TRAINED, ec=RED, size=8.5)
    ax.plot([66.0, 72.0], [9.0, 9.0], color=INK, lw=1.4)
    arrow(ax, (72.0, 9.0), (72.0, 17.0))
    plus(ax, 72.0, 18.5)
    arrow(ax, (73.4, 18.5), (78.0, 18.5))
    label(ax, 79.0, 18.5, "y  (…, out)", size=10, weight="bold", ha="left")
    label(ax, 58.0, 32.0, "y = W x + (α / r) · B A x", size=10, color=INK, ha="left")
    label(ax, 76.0, 10.5, "SmolLM2's q_proj at r = 8:\nW 576 × 576 = 331,776 frozen,\nA and B 8 · (576 + 576)\n"
          "= 9,216 trained (2.8%)", size=8.3, ha="left", va="top", color=GREY_DARK)
    label(ax, 2.0, 36.3, "", size=1)
    return fig


# ----------------------------------------------------------------------------------------------
# Lesson 06: evaluation


@figure("vqa_accuracy", "VQA accuracy with ten human answers: for each of the ten ways of leaving one human out, "
                        "min(agreeing humans / 3, 1); the score is the mean of the ten, so red scores 1.0, maroon "
                        "0.6, crimson 0.3 and pink 0")
def vqa_accuracy_figure() -> Figure:
    fig, ax = new_figure(10, 3.5)
    title(ax, fig, "VQA accuracy: min(agreeing humans / 3, 1), averaged over the 10 ways to leave one human out")
    humans = ["red"] * 4 + ["maroon"] * 2 + ["dark red"] * 2 + ["burgundy", "crimson"]
    predictions = [("Red.", "red"), ("maroon", "maroon"), ("crimson", "crimson"), ("pink", "pink")]
    cw, x0, top = 6.4, 22.0, 25.0
    label(ax, 2, top + 1.6, "10 human answers", size=8.8, ha="left")
    for k, h in enumerate(humans):
        _token(ax, x0 + k * cw, top, cw - 0.4, 3.2, h, fc=GREY, ec=GREY_DARK, size=7.6)
    label(ax, x0 + 5 * cw, top + 4.8, "column k: human k left out, 9 answers remain", size=8.3, color=GREY_DARK)
    label(ax, x0 + 10 * cw + 4.0, top + 1.6, "score", size=8.8, weight="bold")
    greens = matplotlib.colormaps["Greens"]
    for r, (shown, norm) in enumerate(predictions):
        y = top - 5.5 - r * 4.6
        label(ax, 2, y + 1.6, f"prediction {shown!r}", size=8.8, ha="left")
        credits = []
        for k in range(10):
            agree = sum(h == norm for i, h in enumerate(humans) if i != k)
            credit = min(1.0, agree / 3)
            credits.append(credit)
            _token(ax, x0 + k * cw, y, cw - 0.4, 3.2, f"{agree} → {credit:.2f}".replace("1.00", "1"),
                   fc=greens(0.08 + 0.55 * credit), ec="white", size=7.6)
        label(ax, x0 + 10 * cw + 4.0, y + 1.6, f"{np.mean(credits):.2f}", size=9.5, weight="bold")
    label(ax, 2, 2.0, "Each cell: humans agreeing among the 9 left → min(count / 3, 1). Both sides are normalised "
          "first ('Red.' → 'red'). One agreeing human is worth 0.3, three 0.9.", size=8.4, ha="left",
          color=GREY_DARK)
    return fig


# ----------------------------------------------------------------------------------------------
# Lesson 07: deployment


@figure("deploy_path", "From the trained model to the board: merge the LoRA adapters, export to ONNX (image encoder, "
                       "decoder with its KV cache, token embeddings) and GGUF, quantise to int8, build a bundle with "
                       "its runner and manifest, run it on a Jetson Orin Nano; each step checked against PyTorch")
def deploy_path_figure() -> Figure:
    fig, ax = new_figure(10, 4.4)
    title(ax, fig, "the deploy path: every step proves it computes what PyTorch computes")
    y0, h = 16.5, 19.0

    def stage(x, w, head, body, colour, check, where, y=y0, height=h, ec=GREY_DARK, size=8.3):
        box(ax, x, y, w, height, "", fc=colour, ec=ec)
        label(ax, x + w / 2, y + height - 2.4, head, size=9, weight="bold")
        label(ax, x + w / 2, y + (height - 2.4) / 2, body, size=size)
        if check:
            label(ax, x + w / 2, y0 - 2.0, "✓ " + check, size=8.3, color=TEXT_DARK)
        label(ax, x + w / 2, y0 - 4.6, where, size=8, color=GREY_DARK)

    stage(2.0, 11.5, "trained", "ViT\n+ projector\n+ decoder\nwith LoRA\nadapters A, B", GREY, "", "lesson 05")
    stage(16.0, 12.5, "merge LoRA", "W' = W + (α/r)·BA\n\nplain nn.Linear\nlayers again", TRAINED, "same logits",
          "section 2")
    arrow(ax, (13.7, y0 + h / 2), (15.8, y0 + h / 2))
    ex, ew = 31.5, 23.0
    box(ax, ex, y0 + 7.2, ew, 11.8, "", fc=VISION, ec=VISION_DARK)
    label(ax, ex + ew / 2, y0 + 16.6, "ONNX", size=9, weight="bold")
    label(ax, ex + ew / 2, y0 + 11.4, "image_encoder.onnx: ViT + projector\ndecoder.onnx: KV cache in and out\n"
          "embed_tokens.npy", size=7.8)
    box(ax, ex, y0, ew, 6.4, "", fc=PROJ, ec=PROJ_DARK)
    label(ax, ex + ew / 2, y0 + 4.4, "GGUF", size=9, weight="bold")
    label(ax, ex + ew / 2, y0 + 1.8, "decoder-f16.gguf for llama.cpp", size=7.8)
    label(ax, ex + ew / 2, y0 - 2.0, "✓ parity checks, GGUF read back", size=8.3, color=TEXT_DARK)
    label(ax, ex + ew / 2, y0 - 4.6, "sections 6 and 7", size=8, color=GREY_DARK)
    arrow(ax, (28.7, y0 + h / 2), (31.3, y0 + 13.0))
    arrow(ax, (28.7, y0 + h / 2), (31.3, y0 + 3.2))
    box(ax, 57.5, y0 + 7.2, 11.5, 11.8, "", fc=FROZEN, ec=GREY_DARK)
    label(ax, 63.25, y0 + 16.6, "int8", size=9, weight="bold")
    label(ax, 63.25, y0 + 11.0, "int8 copies\nof the graphs\n(dynamic)", size=8.3)
    label(ax, 63.25, y0 - 2.0, "✓ accuracy measured", size=8.3, color=TEXT_DARK)
    label(ax, 63.25, y0 - 4.6, "section 9", size=8, color=GREY_DARK)
    arrow(ax, (54.7, y0 + 13.0), (57.3, y0 + 13.0))
    arrow(ax, (69.2, y0 + 13.0), (71.8, y0 + 13.0))
    arrow(ax, (54.7, y0 + 3.2), (71.8, y0 + 3.2))
    stage(72.0, 12.0, "bundle/", "run.py\nbenchmark.py\ntokenizer\nbundle.json\nmanifest.json\nREADME.md", TEXT,
          "run.py = PyTorch", "sections 8 and 10")
    arrow(ax, (84.2, y0 + h / 2), (86.3, y0 + h / 2))
    stage(86.5, 11.5, "Jetson", "Orin Nano\n8 GB\n\nonnxruntime-\ngpu, TensorRT,\nllama.cpp", GREY, "",
          "benchmark.py there")
    ax.add_patch(FancyBboxPatch((2.2, 1.2), 95.6, 6.6, boxstyle="round,pad=0.3", fc="#fafafa", ec=GREY, lw=1.0))
    label(ax, 50, 4.5, "Before shipping, the budget (sections 3-5): weight bytes + KV-cache bytes + activations against "
          "the ~5.2 GB an 8 GB Orin Nano leaves;\ndecode is memory-bound, so tokens/s is at most the bandwidth "
          "(68 GB/s, 102 GB/s in Super mode) divided by the bytes read per token", size=8.5)
    return fig


# ----------------------------------------------------------------------------------------------
# Lesson 09: reading and pointing


@figure("dual_branch", "Vary-toy's two vision branches with the course's sizes: the 128 px picture shrunk to 64 px "
                       "for the first ViT (8 x 8 patches, pixel shuffle 2, 16 tokens) and read at 128 px by the second "
                       "(16 x 16 patches, pixel shuffle 4, 16 tokens); each has its own projector, and the two token "
                       "runs are concatenated before the question; the answer is a word or a box written as text")
def dual_branch_figure() -> Figure:
    fig, ax = new_figure(10, 4.0)
    title(ax, fig, "two vision branches (Vary-toy): the first shrunk, the second at full resolution")
    image(ax, toy_image(128), 2.0, 12.0, 13.0, 13.0)
    label(ax, 8.5, 9.6, "128 px picture", size=8.8)
    rows = [("first branch (the course ViT)", "shrunk to 64 px", 8, 2, 26.0, VISION, VISION_DARK),
            ("second branch (new)", "at 128 px", 16, 4, 5.0, PROJ, PROJ_DARK)]
    for name, size_text, grid, r, y, fc, ec in rows:
        arrow(ax, (15.5, 18.5), (21.0, y + 4.5))
        label(ax, 22.0, y + 10.0, name, size=9, ha="left", weight="bold", color=ec)
        _grid(ax, 22.0, y, 9.0, grid, fc, ec=ec, lw=0.4)
        label(ax, 26.5, y - 1.8, f"{size_text}: {grid} × {grid} patches", size=8.3)
        arrow(ax, (32.0, y + 4.5), (37.0, y + 4.5))
        label(ax, 34.5, y + 6.4, f"r = {r}", size=8.3)
        box(ax, 37.5, y + 1.5, 11.5, 6.0, "ViT + pixel\nshuffle + linear", fc=fc, ec=ec, size=8.3)
        arrow(ax, (49.5, y + 4.5), (54.0, y + 4.5))
        for t in range(4):
            rect(ax, 54.5 + t * 2.2, y + 3.0, 2.0, 3.0, fc=mix(ec, 0.35), ec="white")
        label(ax, 63.8, y + 4.5, "× 16 tokens", size=8.3, ha="left")
    arrow(ax, (70.5, 30.5), (76.0, 22.0))
    arrow(ax, (70.5, 9.5), (76.0, 17.0))
    box(ax, 76.5, 14.0, 21.0, 11.0, "", fc=TEXT, ec=TEXT_DARK)
    label(ax, 87.0, 22.4, "decoder input:", size=8.6, weight="bold")
    label(ax, 87.0, 18.6, "16 + 16 <image> tokens,\nthen the prompt", size=8.3)
    label(ax, 87.0, 11.0, "answers: \"lemon\"\nor \"[151, 200, 406, 455]\"", size=8.3, va="top", color=TEXT_DARK)
    return fig


# ----------------------------------------------------------------------------------------------
# Lesson 08: the design space


@figure("part_registry", "The parts registry: a config names each part by kind (vision.kind, projector.kind, "
                         "decoder.kind, fusion.kind); the registry maps each name to the class a decorator registered; "
                         "the model builds every part from it, so a new kind is one new file with one decorator")
def part_registry_figure() -> Figure:
    fig, ax = new_figure(10, 3.6)
    title(ax, fig, "swap a part by adding one file: a config names kinds, the registry builds them")
    rows = [("vision.kind", '"siglip"', "VisionEncoder", VISION, VISION_DARK),
            ("projector.kind", '"linear" | "mlp" | "perceiver"', "LinearConnector, MLPConnector, ...", PROJ, PROJ_DARK),
            ("decoder.kind", '"llama"', "Decoder", TEXT, TEXT_DARK),
            ("fusion.kind", '"autoregressive" | "cross_attention"', "AutoregressiveFusion, ...", GREY, GREY_DARK)]
    label(ax, 12.0, 29.5, "VLMConfig", size=10, weight="bold")
    label(ax, 45.0, 29.5, "registry: name -> class", size=10, weight="bold")
    label(ax, 81.0, 29.5, "VisionLanguageModel(config)", size=10, weight="bold")
    for k, (field_name, kinds, cls, fc, ec) in enumerate(rows):
        y = 21.5 - k * 6.0
        box(ax, 2, y, 21, 4.6, f"{field_name} = ...", fc=fc, ec=ec, size=8.6)
        arrow(ax, (23.4, y + 2.3), (27.8, y + 2.3))
        box(ax, 28, y, 35, 4.6, f"{kinds}\n{cls}", fc="white", ec=ec, size=7.8)
        arrow(ax, (63.4, y + 2.3), (67.8, y + 2.3))
        box(ax, 68, y, 26, 4.6, ["model.vision", "model.projector", "model.decoder", "model.fusion"][k], fc=fc, ec=ec,
            size=8.6)
    label(ax, 45.0, 1.8, '@register_connector("my_kind")  class MyConnector(nn.Module): ...   then   '
          'ProjectorConfig(kind="my_kind")', size=8.6, color=PROJ_DARK, family="DejaVu Sans Mono")
    return fig


def _tokens(ax, x, y, n, w, h, fc, ec, gap=0.3):
    for i in range(n):
        rect(ax, x + i * (w + gap), y, w, h, fc=fc, ec=ec, lw=0.8)


@figure("connectors", "Three connectors on one 8 x 8 grid of patches: linear after a pixel shuffle by 2 (16 tokens, "
                      "nanoVLM and Idefics3), the same with Linear-GELU-Linear (LLaVA-1.5), and a perceiver "
                      "resampler whose 8 learned queries cross-attend to all 64 patches and the queries (8 tokens, "
                      "Idefics2: 64 from 729)")
def connectors_figure() -> Figure:
    fig, ax = new_figure(10, 4.4)
    title(ax, fig, "three connectors: how many tokens an image costs the decoder")
    _grid(ax, 2.5, 10.0, 16.0, 8, VISION, ec=VISION_DARK, lw=0.5)
    label(ax, 10.5, 7.5, "8 × 8 = 64 patches\n(the ViT's output)", size=8.6)
    rows = [("linear (nanoVLM, Idefics3)", "pixel shuffle r = 2 → Linear", 16, 31.5),
            ("mlp (LLaVA-1.5, TinyLLaVA)", "pixel shuffle r = 2 → Linear · GELU · Linear", 16, 21.0),
            ("perceiver (Idefics2, Flamingo)", "8 learned queries attend to [patches; queries], ×L", 8, 10.5)]
    for name, how, n, y in rows:
        arrow(ax, (19.5, 18.0), (27.5, y + 2.0), color=GREY_DARK, lw=1.1)
        box(ax, 28, y, 30, 5.0, "", fc=PROJ, ec=PROJ_DARK)
        label(ax, 43, y + 3.3, name, size=8.6, weight="bold")
        label(ax, 43, y + 1.4, how, size=7.6)
        arrow(ax, (58.4, y + 2.5), (61.5, y + 2.5))
        _tokens(ax, 62, y + 1.0, n, 1.55, 3.0, mix(TEXT_DARK, 0.4), TEXT_DARK)
        label(ax, 62 + n * 1.85 + 0.8, y + 2.5, f"{n}", size=9, weight="bold", ha="left")
    label(ax, 75, 5.0, "tokens = patches / r² for a pixel shuffle,\nnum_queries for a resampler (any image size)",
          size=8.4, color=PROJ_DARK)
    return fig


@figure("fusion", "Two ways to fuse: fully autoregressive writes the image tokens into the decoder's input next to "
                  "the text; cross-attention leaves one marker in the text and inserts gated blocks before some "
                  "decoder layers, where the text attends to the image tokens through tanh gates that start at 0")
def fusion_figure() -> Figure:
    fig, ax = new_figure(10, 4.6)
    title(ax, fig, "fully autoregressive (left) vs gated cross-attention (right)")
    # left: image tokens in the sequence
    label(ax, 23, 39.5, "image tokens in the decoder's input", size=9.5, weight="bold")
    for k in range(3):
        box(ax, 4, 8 + k * 9.0, 38, 6.0, f"decoder layer {k + 1}", fc=TEXT, ec=TEXT_DARK, size=8.6)
    _tokens(ax, 4, 2.0, 6, 2.6, 3.0, mix(PROJ_DARK, 0.3), PROJ_DARK)
    _tokens(ax, 22, 2.0, 7, 2.6, 3.0, mix(TEXT_DARK, 0.45), TEXT_DARK)
    label(ax, 11.5, 0.8, "image tokens", size=7.6, color=PROJ_DARK)
    label(ax, 31, 0.8, "text tokens", size=7.6, color=TEXT_DARK)
    label(ax, 23, 36.0, "every image token pays every layer", size=8.2, color=GREY_DARK)
    ax.plot([49, 49], [2, 40], color=GREY, lw=1.0)
    # right: blocks between layers
    label(ax, 75, 39.5, "one marker in the text; blocks read the image", size=9.5, weight="bold")
    for k in range(3):
        y = 6.5 + k * 10.0
        box(ax, 56, y, 28, 4.2, f"decoder layer {k + 1}", fc=TEXT, ec=TEXT_DARK, size=8.2)
        box(ax, 56, y + 4.6, 28, 4.2, "gated cross-attention", fc=PROJ, ec=PROJ_DARK, size=8.0)
        arrow(ax, (91.5, y + 6.7), (84.5, y + 6.7), color=PROJ_DARK, lw=1.0, scale=8)
    _tokens(ax, 92, 12.0, 3, 1.8, 14.0, mix(PROJ_DARK, 0.3), PROJ_DARK)
    label(ax, 95, 9.5, "image\ntokens", size=7.6, color=PROJ_DARK)
    _tokens(ax, 56, 2.0, 1, 2.6, 3.0, mix(PROJ_DARK, 0.3), PROJ_DARK)
    _tokens(ax, 59.3, 2.0, 7, 2.6, 3.0, mix(TEXT_DARK, 0.45), TEXT_DARK)
    label(ax, 70, 0.8, "marker + text tokens", size=7.6, color=TEXT_DARK)
    label(ax, 75, 36.0, "x + tanh(α)·XAttn(x, image), α = 0 at the start", size=8.2, color=GREY_DARK)
    return fig


@figure("image_splitting", "Image splitting as Idefics3 and SmolVLM do it: a wide image resized and cut into 2 x 3 "
                           "tiles of the encoder's size plus a downscaled global view; in the prompt each tile's image "
                           "tokens follow its <row_i_col_j> marker, rows end with a newline, and the global view "
                           "comes last after a blank line")
def image_splitting_figure() -> Figure:
    fig, ax = new_figure(10, 3.6)
    title(ax, fig, "image splitting: tiles at the encoder's size, plus the whole image downscaled")
    picture = np.repeat(toy_image(64), 3, axis=1)[:, ::2]  # a wide picture, 64 x 96
    image(ax, picture, 2.0, 9.0, 24.0, 16.0)
    label(ax, 14.0, 27.0, "a wide image", size=8.6)
    arrow(ax, (27.5, 17.0), (32.0, 17.0))
    tile = 7.6
    for r in range(2):
        for c in range(3):
            x, y = 33.0 + c * (tile + 0.8), 17.4 - r * (tile + 0.8)
            image(ax, picture[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32], x, y, tile, tile)
            label(ax, x + tile / 2, y + tile + 0.9 if r == 0 else y - 0.9, f"<row_{r + 1}_col_{c + 1}>", size=6.6,
                  color=VISION_DARK)
    image(ax, toy_image(64), 61.0, 13.0, tile, tile)
    label(ax, 61.0 + tile / 2, 11.9, "<global-img>", size=6.8, color=VISION_DARK)
    label(ax, 73.0, 17.0, "6 tiles + 1 global view\n= 7 views, each its\nown run of image tokens", size=8.4, ha="left")
    lines = ["<fake><row_1_col_1><image>×n<fake><row_1_col_2><image>×n<fake><row_1_col_3><image>×n\\n",
             "<fake><row_2_col_1><image>×n<fake><row_2_col_2><image>×n<fake><row_2_col_3><image>×n\\n",
             "\\n<fake><global-img><image>×n<fake>"]
    for k, line in enumerate(lines):
        label(ax, 2.0, 4.7 - k * 1.9, line, size=7.2, ha="left", family="DejaVu Sans Mono", color=PROJ_DARK)
    label(ax, 2.0, 6.9, "the prompt, as transformers' Idefics3Processor writes it (<fake> is <fake_token_around_image>):",
          size=8.2, ha="left")
    return fig


# ----------------------------------------------------------------------------------------------
# Embedding into notebooks


def solution_notebooks() -> list[Path]:
    return sorted((REPO / "solutions").glob("[0-9][0-9]_*.ipynb"))


def referenced(nb) -> list[tuple[object, list[str]]]:
    """(markdown cell, [NAME.png, ...]) for every markdown cell that shows a figure."""
    out = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            names = ATTACHMENT.findall(cell.source)
            if names:
                out.append((cell, names))
    return out


def embed(pngs: dict[str, bytes], check: bool) -> list[str]:
    """Write (or with check, compare) every shown figure into its cell's attachments. Returns what differs."""
    import nbformat

    from vlm_course.grading.sync import clean_solution

    stale = []
    for path in solution_notebooks():
        nb = nbformat.read(path, as_version=4)
        changed = False
        for cell, names in referenced(nb):
            unknown = [n for n in names if n not in pngs]
            if unknown:
                raise SystemExit(f"{path.name}: no figure named {unknown} in {Path(__file__).name}")
            want = {n: {"image/png": base64.b64encode(pngs[n]).decode("ascii")} for n in sorted(set(names))}
            if cell.get("attachments") != want:
                changed = True
                cell["attachments"] = want
        for cell in nb.cells:  # attachments no longer shown in the cell are dropped
            if cell.cell_type == "markdown" and cell.get("attachments") and not ATTACHMENT.search(cell.source):
                changed = True
                del cell["attachments"]
        if changed:
            stale.append(path.name)
            if not check:
                nbformat.write(nb, path)
                path.write_text(clean_solution(path), encoding="utf-8")
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--embed", action="store_true", help="also embed the figures in solutions/, regenerate lessons/")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything differs")
    parser.add_argument("names", nargs="*", help="only these figures (NAME or NAME.png)")
    args = parser.parse_args(argv)
    names = [n if n.endswith(".png") else f"{n}.png" for n in args.names] or list(FIGURES)
    pngs = {name: render(name) for name in names}
    stale = []
    for name, png in pngs.items():
        path = HERE / name
        if not path.exists() or path.read_bytes() != png:
            stale.append(name)
            if not args.check:
                path.write_bytes(png)
                print(f"wrote {path.relative_to(REPO)} ({len(png) / 1000:.1f} kB)")
    if args.embed or args.check:
        if args.names:
            pngs = {name: render(name) for name in FIGURES}
        notebooks = embed(pngs, args.check)
        stale += notebooks
        if notebooks and not args.check:
            from vlm_course.grading.sync import sync_lessons

            print("embedded in", ", ".join(notebooks))
            sync_lessons(REPO / "solutions", REPO / "lessons", check=False)
    if args.check and stale:
        print("out of date:", ", ".join(stale), "- run: python docs/figures/make_figures.py --embed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
