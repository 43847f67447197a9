"""Plots and widgets for the lessons, organised by lesson.

Every plotting function draws one figure and shows it (`show=True`, the notebook default), or returns the
matplotlib Figure without showing it (`show=False`: tests, saving to a file). Widgets fall back to a static
figure when there is no live Jupyter kernel (a script, nbconvert to HTML, a viewer on GitHub).

Images may be given as a PIL image, a path, an (H, W, 3) array, or a (3, H, W) tensor; normalised tensors
are mapped back to [0, 1] with `mean`/`std` (SigLIP's are 0.5 and 0.5).

Sections: shared helpers | lesson 01 (ViT patching) | lesson 02 (projector). Add a section per lesson.
"""

from __future__ import annotations

from typing import Callable, Iterable

import matplotlib.pyplot as plt
import numpy as np
import torch

# ==============================================================================================
# Shared helpers


def in_live_kernel() -> bool:
    """True inside a running Jupyter kernel (where ipywidgets can talk to the front end)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def to_image_array(image, mean=None, std=None) -> np.ndarray:
    """Any image-like input -> float array (H, W, 3) in [0, 1] for imshow."""
    if isinstance(image, torch.Tensor):
        x = image.detach().float().cpu()
        if x.dim() == 4:
            x = x[0]
        if mean is not None and std is not None:
            x = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
        array = x.permute(1, 2, 0).numpy()
    elif isinstance(image, np.ndarray):
        array = image.astype(np.float32)
        array = array / 255.0 if array.max() > 1.0 else array
    else:
        from .processing import open_image, to_rgb

        array = np.asarray(to_rgb(open_image(image)), dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.clip(array, 0.0, 1.0)


def _finish(fig, show: bool):
    fig.tight_layout()
    if show:
        plt.show()
        return None
    return fig


def _widget_or_static(make_widget: Callable, draw_static: Callable, static: bool | None) -> None:
    """Show an ipywidgets control in a live kernel; otherwise (or if ipywidgets is missing) a static figure."""
    if static is None:
        static = not in_live_kernel()
    if not static:
        try:
            make_widget()
            return
        except ImportError:
            pass
    draw_static()


# ==============================================================================================
# Lesson 01: ViT patching


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


# ==============================================================================================
# Lesson 02: the projector


def plot_pixel_shuffle(grid_size: int, r: int, shuffle: Callable | None = None, show: bool = True):
    """Which patches end up in which token, and in what order, for a given pixel-shuffle function.

    Left: the patch grid, coloured by the token each patch joins. Right: each token as its r*r slots, in
    the order the shuffle concatenates them, labelled with patch numbers. The layout is computed by running
    `shuffle` (default: vlm_course's, i.e. Idefics3's) on patch numbers, so it is the truth, not a drawing.
    """
    if shuffle is None:
        from .projector import pixel_shuffle as shuffle
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


# ==============================================================================================
# Lesson 06: evaluation


def plot_vqa_credit(vqa_fn: Callable, num_answers: int = 10, show: bool = True):
    """VQA accuracy against how many of `num_answers` humans gave the model's answer.

    `vqa_fn(prediction, answers)` is the learner's `vqa_accuracy`; the dashed line is min(#agree / 3, 1)
    over all answers at once, which the leave-one-out average smooths (1 -> 0.3, 3 -> 0.9, 4 -> 1.0).
    """
    agree = np.arange(num_answers + 1)
    scores = [vqa_fn("yes", ["yes"] * n + ["no"] * (num_answers - n)) for n in agree]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.plot(agree, np.minimum(agree / 3, 1), "--", color="grey", label="min(#agree / 3, 1), all answers at once")
    ax.plot(agree, scores, "o-", color="tab:blue", label="VQA accuracy (leave-one-out average)")
    for n, s in zip(agree[:5], scores[:5]):
        ax.annotate(f"{s:.2f}", (n, s), textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xlabel(f"humans (of {num_answers}) who gave the model's answer")
    ax.set_ylabel("score")
    ax.set_xticks(agree)
    ax.set_ylim(-0.05, 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("partial credit: one agreeing human is worth 0.3, three or more make the answer right")
    return _finish(fig, show)


def plot_anls_curve(anls_fn: Callable, answer: str = "invoice 2024", threshold: float = 0.5, show: bool = True):
    """ANLS of predictions with 0, 1, 2, ... wrong characters in `answer` (substituted from the end).

    `anls_fn(prediction, answers, threshold)` is the learner's `anls`. The score falls by 1/len per wrong
    character, then drops to 0 once the similarity is below the threshold.
    """
    wrong = np.arange(len(answer) + 1)
    predictions = [answer[:len(answer) - k] + "#" * k for k in wrong]
    scores = [anls_fn(p, [answer], threshold) for p in predictions]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.plot(wrong, 1 - wrong / len(answer), "--", color="grey", label="1 - normalised edit distance")
    ax.plot(wrong, scores, "o-", color="tab:purple", label=f"ANLS (threshold {threshold:g})")
    ax.axhline(threshold, color="tab:red", lw=0.8, ls=":")
    ax.set_xlabel(f"wrong characters in the {len(answer)}-character answer {answer!r}")
    ax.set_ylabel("score")
    ax.set_ylim(-0.05, 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("near misses keep most of the credit; more than half wrong scores 0")
    return _finish(fig, show)


# ==============================================================================================
# Lesson 07: Jetson deployment


def plot_memory_budget(budgets: dict[str, dict[str, float]], usable_bytes: float, device: str = "",
                       show: bool = True):
    """Stacked bars of inference memory, one bar per configuration, against a device's usable memory.

    `budgets`: {"bar label": {"weights": bytes, "KV cache": bytes, ...}}; parts are stacked in the order they
    first appear. The red line is `usable_bytes` (e.g. ~5.2 GB on an 8 GB Jetson Orin Nano).
    """
    labels = list(budgets)
    parts = list(dict.fromkeys(part for budget in budgets.values() for part in budget))
    colours = plt.cm.Set2(np.linspace(0, 1, max(len(parts), 3)))
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(labels) + 1.8))
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
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("inference memory: weights + KV cache + activations + runtime")
    return _finish(fig, show)


def plot_decode_roofline(lines: dict[str, Callable[[int], float]], contexts: Iterable[int],
                         measured: dict[str, tuple[int, float]] | None = None, show: bool = True):
    """Decode speed limit against context length, one line per setting (log-log).

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
    ax.set_yscale("log")
    ax.set_xlabel("tokens in the KV cache (context)")
    ax.set_ylabel("tokens / s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("decode is memory-bound: tokens/s ~ bandwidth / bytes read per token")
    return _finish(fig, show)
