"""Lesson 01, ViT patching: the patch grid, one patch, the patch sequence, position similarity, and
attention maps (static, or as widgets in a live kernel)."""

from __future__ import annotations

from typing import Iterable

import matplotlib.pyplot as plt
import numpy as np
import torch

from .common import _finish, _widget_or_static, to_image_array


def show_patch_grid(image, patch_size: int, numbers: bool = True, mean=None, std=None, title: str | None = None,
                    ax=None, show: bool = True):
    """The image cut into patches, each numbered in the order the transformer reads them (row-major)."""
    array = to_image_array(image, mean, std)
    h, w = array.shape[:2]
    rows, cols = h // patch_size, w // patch_size
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(5 * w / max(h, w) + 1, 5 * h / max(h, w) + 0.5))
    ax.imshow(array, extent=(0, w, h, 0))
    for x in range(0, w + 1, patch_size):
        ax.axvline(x, color="white", lw=0.8)
    for y in range(0, h + 1, patch_size):
        ax.axhline(y, color="white", lw=0.8)
    if numbers and rows * cols <= 400:
        size = max(4, min(9, 150 / max(rows, cols)))
        for r in range(rows):
            for c in range(cols):
                ax.text(c * patch_size + patch_size / 2, r * patch_size + patch_size / 2, str(r * cols + c),
                        ha="center", va="center", fontsize=size, color="white",
                        bbox=dict(boxstyle="round,pad=0.1", fc="black", alpha=0.35, lw=0))
    ax.set_title(title or f"{rows} x {cols} = {rows * cols} patches of {patch_size}x{patch_size} px")
    ax.set_xticks([])
    ax.set_yticks([])
    return _finish(fig, show) if fig is not None else None


def show_patch(image, patch_size: int, index: int, mean=None, std=None, show: bool = True):
    """One patch: where it sits in the image, and the patch itself enlarged, with its place in the sequence."""
    array = to_image_array(image, mean, std)
    h, w = array.shape[:2]
    cols = w // patch_size
    row, col = divmod(index, cols)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4.2), gridspec_kw={"width_ratios": [w / h * 1.4, 1]})
    left.imshow(array)
    left.add_patch(plt.Rectangle((col * patch_size - 0.5, row * patch_size - 0.5), patch_size, patch_size,
                                 fill=False, ec="red", lw=2.5))
    left.set_title(f"patch {index}: row {row}, column {col}")
    patch = array[row * patch_size:(row + 1) * patch_size, col * patch_size:(col + 1) * patch_size]
    right.imshow(patch, interpolation="nearest")
    right.set_title(f"{patch_size}x{patch_size}x3 = {patch.size} numbers")
    for axis in (left, right):
        axis.set_xticks([])
        axis.set_yticks([])
    return _finish(fig, show)


def patch_explorer(image, patch_size: int, index: int = 0, mean=None, std=None, static: bool | None = None):
    """A slider over patch indices showing where each patch of the sequence comes from.

    Without a live kernel (or with static=True) it draws the figure for `index` once.
    """
    array = to_image_array(image, mean, std)
    count = (array.shape[0] // patch_size) * (array.shape[1] // patch_size)

    def make_widget():
        import ipywidgets as widgets

        slider = widgets.IntSlider(value=index, min=0, max=count - 1, description="patch", continuous_update=False)
        widgets.interact(lambda patch: show_patch(array, patch_size, patch), patch=slider)

    return _widget_or_static(make_widget, lambda: show_patch(array, patch_size, index), static)


def plot_patch_sequence(patches: torch.Tensor, patch_size: int, channels: int = 3, count: int = 16, mean=None,
                        std=None, show: bool = True):
    """The first `count` rows of a patchified image, drawn back as little squares, in sequence order.

    `patches` is (N, C*p*p) or (1, N, C*p*p) with each vector laid out (C, p, p), as patchify makes it.
    """
    x = patches.detach().float().cpu()
    x = x[0] if x.dim() == 3 else x
    count = min(count, x.shape[0])
    fig, axes = plt.subplots(1, count, figsize=(min(1.0 * count, 16), 1.6))
    for i, ax in enumerate(np.atleast_1d(axes)):
        ax.imshow(to_image_array(x[i].reshape(channels, patch_size, patch_size), mean, std), interpolation="nearest")
        ax.set_title(str(i), fontsize=8)
        ax.axis("off")
    fig.suptitle(f"the sequence the transformer reads: patches 0..{count - 1} of {x.shape[0]}", fontsize=10)
    return _finish(fig, show)


def plot_position_similarity(position_embeddings: torch.Tensor, grid_size: int | tuple[int, int],
                             positions: Iterable[int] | None = None, title: str = "", show: bool = True):
    """Cosine similarity of a few positions' embeddings with every position, drawn on the patch grid.

    Trained ViTs show a bright blob around each position, and row/column stripes: the model learned the 2-D
    layout from 1-D indices (ViT paper, figure 7). A random initialisation shows noise.
    """
    rows, cols = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    e = torch.nn.functional.normalize(position_embeddings.detach().float().cpu(), dim=-1)
    similarity = e @ e.T  # (N, N)
    if positions is None:
        positions = [0, cols // 2, (rows // 2) * cols + cols // 2, rows * cols - 1]
    positions = list(positions)
    maps = [similarity[p].reshape(rows, cols).numpy() for p in positions]
    low, high = min(m.min() for m in maps), max(m.max() for m in maps)  # one colour scale per figure
    fig, axes = plt.subplots(1, len(positions), figsize=(2.6 * len(positions), 2.8))
    for ax, p, similarity_map in zip(np.atleast_1d(axes), positions, maps):
        image = ax.imshow(similarity_map, cmap="viridis", vmin=low, vmax=high)
        ax.plot(p % cols, p // cols, "r+", markersize=10)
        ax.set_title(f"position {p}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=list(np.atleast_1d(axes)), shrink=0.8, label="cosine similarity")
    if title:
        fig.suptitle(title, fontsize=10)
    if show:
        plt.show()
        return None
    return fig


def plot_attention_map(image, weights: torch.Tensor, patch_size: int, query: int, mean=None, std=None,
                       title: str | None = None, ax=None, show: bool = True):
    """Where one patch (the query, red box) looks: its attention weights over all patches, on the image.

    `weights` is (N, N) (row = query) for one head or averaged over heads, or (N,) for the query alone.
    """
    array = to_image_array(image, mean, std)
    h, w = array.shape[:2]
    rows, cols = h // patch_size, w // patch_size
    row_weights = weights.detach().float().cpu()
    row_weights = row_weights[query] if row_weights.dim() == 2 else row_weights
    heat = row_weights.reshape(rows, cols).numpy()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.2, 4.2 * h / w))
    ax.imshow(array.mean(-1), cmap="gray", vmin=0, vmax=1, extent=(0, w, h, 0))  # grey, so the heat map reads
    ax.imshow(heat, cmap="inferno", alpha=0.65, extent=(0, w, h, 0), interpolation="nearest")
    r, c = divmod(query, cols)
    ax.add_patch(plt.Rectangle((c * patch_size, r * patch_size), patch_size, patch_size, fill=False, ec="red", lw=2))
    ax.set_title(title or f"patch {query} attends to ...", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return _finish(fig, show) if fig is not None else None


def plot_attention_maps(image, weights: torch.Tensor, patch_size: int, queries: Iterable[int], mean=None, std=None,
                        title: str = "", show: bool = True):
    """`plot_attention_map` for several query patches side by side."""
    queries = list(queries)
    fig, axes = plt.subplots(1, len(queries), figsize=(3.3 * len(queries), 3.5))
    for ax, q in zip(np.atleast_1d(axes), queries):
        plot_attention_map(image, weights, patch_size, q, mean, std, ax=ax, show=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return _finish(fig, show)


def attention_explorer(image, weights: torch.Tensor, patch_size: int, query: int = 0, mean=None, std=None,
                       static: bool | None = None):
    """A slider over query patches for `plot_attention_map`; a static figure without a live kernel."""
    array = to_image_array(image, mean, std)
    count = weights.shape[-1]

    def make_widget():
        import ipywidgets as widgets

        slider = widgets.IntSlider(value=query, min=0, max=count - 1, description="query", continuous_update=False)
        widgets.interact(lambda q: plot_attention_map(array, weights, patch_size, q), q=slider)

    return _widget_or_static(make_widget, lambda: plot_attention_map(array, weights, patch_size, query), static)
