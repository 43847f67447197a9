"""Lesson 02, the projector: where pixel shuffle sends each patch, and image tokens against resolution."""

from __future__ import annotations

from typing import Callable, Iterable

import matplotlib.pyplot as plt
import numpy as np
import torch

from .common import _finish


def plot_pixel_shuffle(grid_size: int, r: int, shuffle: Callable | None = None, show: bool = True):
    """Which patches end up in which token, and in what order, for a given pixel-shuffle function.

    Left: the patch grid, coloured by the token each patch joins. Right: each token as its r*r slots, in
    the order the shuffle concatenates them, labelled with patch numbers. The layout is computed by running
    `shuffle` (default: vlm_course's, i.e. Idefics3's) on patch numbers, so it is the truth, not a drawing.
    """
    if shuffle is None:
        from ..projector import pixel_shuffle as shuffle
    n = grid_size * grid_size
    labels = torch.arange(n, dtype=torch.float64).reshape(1, n, 1)
    tokens = shuffle(labels, r)[0].round().long()  # (n / r^2, r^2): patch numbers per token, in order
    owner = torch.empty(n, dtype=torch.long)
    for t, members in enumerate(tokens):
        owner[members] = t
    colours = plt.get_cmap("tab20")(np.arange(tokens.shape[0]) % 20)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.6), gridspec_kw={"width_ratios": [1, 1.25]})
    left.imshow(colours[owner.reshape(grid_size, grid_size).numpy()], interpolation="nearest")
    for p in range(n):
        left.text(p % grid_size, p // grid_size, str(p), ha="center", va="center", fontsize=8)
    left.set_title(f"{grid_size}x{grid_size} patches; colour = token they join (r={r})")
    right.imshow(colours[np.repeat(np.arange(tokens.shape[0])[:, None], r * r, axis=1)], aspect="auto",
                 interpolation="nearest")
    for t in range(tokens.shape[0]):
        for s in range(r * r):
            right.text(s, t, str(int(tokens[t, s])), ha="center", va="center", fontsize=8)
    right.set_xlabel(f"slot = one patch vector (D numbers); a token is {r * r}D wide")
    right.set_ylabel("token")
    right.set_title(f"{tokens.shape[0]} tokens, patches in concatenation order")
    for axis in (left, right):
        axis.set_xticks([])
    left.set_yticks([])
    right.set_yticks(range(tokens.shape[0]))
    return _finish(fig, show)


def plot_tokens_vs_resolution(token_fn: Callable[[int, int, int], int], patch_size: int = 16,
                              factors: Iterable[int] = (1, 2, 3, 4), sizes: Iterable[int] | None = None,
                              marks: dict[str, tuple[int, int, int]] | None = None, show: bool = True):
    """Image tokens per image against resolution, one line per shuffle factor r (log scale).

    `token_fn(image_size, patch_size, r)` is the learner's `image_tokens`; sizes where it raises (grid not
    divisible by r) are left out. `marks` labels known models: {"nanoVLM": (224, 16, 2), ...}.
    """
    sizes = list(sizes) if sizes is not None else list(range(patch_size * 4, 1024 + 1, patch_size))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in factors:
        points = []
        for s in sizes:
            try:
                points.append((s, token_fn(s, patch_size, r)))
            except ValueError:
                continue
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker=".", label=f"r = {r}")
    for (name, (s, p, r)), marker in zip((marks or {}).items(), "*DPXsv^<>"):
        tokens = token_fn(s, p, r)
        ax.plot([s], [tokens], marker, color="black", markersize=9, linestyle="none",
                label=f"{name}: {s} px, patch {p}, r={r} -> {tokens}")
    ax.set_yscale("log")
    ax.set_xlabel(f"image size (px, square; patch size {patch_size} for the lines)")
    ax.set_ylabel("image tokens per image")
    ax.set_title("tokens grow with the square of the resolution; pixel shuffle divides them by r^2")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _finish(fig, show)
