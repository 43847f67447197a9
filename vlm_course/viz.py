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
# Lesson 03: the decoder


def plot_rope_tables(cos: torch.Tensor, theta: float | None = None, show: bool = True):
    """RoPE's cos table (T, head_dim) as an image: one row per position, one column per dimension.

    The left columns turn fast (stripes), the right ones slowly (almost flat), and the two halves are equal:
    dimension i and i + d/2 share an angle, because they are the two coordinates of one rotated pair.
    """
    table = cos.detach().float().cpu()
    table = table[0] if table.dim() == 3 else table
    t, d = table.shape
    fig, ax = plt.subplots(figsize=(8, 3.8))
    image = ax.imshow(table.numpy(), aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    ax.axvline(d / 2 - 0.5, color="black", lw=2.5, ls="--")
    ax.set_xlabel(f"dimension (0..{d - 1}); dashed line: start of the second half, paired with the first")
    ax.set_ylabel("position")
    ax.set_title(f"cos(position x frequency), head_dim {d}" + (f", theta {theta:g}" if theta else "") +
                 "\nfast pairs on the left, slow on the right; the two halves are equal", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.03)
    return _finish(fig, show)


def plot_rope_scores(scores: torch.Tensor, title: str | None = None, show: bool = True):
    """q.k scores (T, T) of one query vector placed at every position m and one key vector at every position n.

    With RoPE the picture is constant along each diagonal: the score depends only on m - n.
    """
    array = scores.detach().float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    image = ax.imshow(array, cmap="viridis", interpolation="nearest")
    ax.set_xlabel("key position n")
    ax.set_ylabel("query position m")
    ax.set_title(title or "rotated q . rotated k: constant along diagonals (depends on m - n)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _finish(fig, show)


def plot_causal_gqa(num_heads: int, num_kv_heads: int, q_len: int, kv_len: int | None = None, show: bool = True):
    """Left: which keys each query may see (causal, with `kv_len - q_len` cached positions before the queries).
    Right: which KV head each query head reads in grouped-query attention (repeat_interleave grouping)."""
    kv_len = q_len if kv_len is None else kv_len
    past = kv_len - q_len
    allowed = torch.arange(kv_len)[None, :] <= torch.arange(past, kv_len)[:, None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [max(kv_len, 4), 6]})
    left.imshow(allowed.numpy(), cmap="Greens", vmin=0, vmax=1.4, interpolation="nearest")
    for i in range(q_len):
        for j in range(kv_len):
            left.text(j, i, "✓" if allowed[i, j] else "", ha="center", va="center", fontsize=8)
    left.set_xticks(range(kv_len))
    left.set_yticks(range(q_len), [str(past + i) for i in range(q_len)])
    left.set_xlabel("key position" + (f" (0..{past - 1} come from the cache)" if past else ""))
    left.set_ylabel("query position")
    left.set_title("causal mask: a query sees keys at positions <= its own")
    group = num_heads // num_kv_heads
    colours = plt.get_cmap("tab10")(np.arange(num_kv_heads) % 10)
    for h in range(num_heads):
        right.add_patch(plt.Rectangle((h, 1), 0.9, 0.8, color=colours[h // group]))
        right.text(h + 0.45, 1.4, f"q{h}", ha="center", va="center", fontsize=8)
        right.annotate("", xy=(h // group * group + (group - 0.1) / 2, 0.45), xytext=(h + 0.45, 1.0),
                       arrowprops=dict(arrowstyle="-", color="grey", lw=0.8))
    for g in range(num_kv_heads):
        right.add_patch(plt.Rectangle((g * group, 0), group - 0.1, 0.45, color=colours[g], alpha=0.7))
        right.text(g * group + (group - 0.1) / 2, 0.22, f"kv{g}", ha="center", va="center", fontsize=9)
    right.set_xlim(-0.2, num_heads + 0.1)
    right.set_ylim(-0.1, 1.9)
    right.axis("off")
    right.set_title(f"{num_heads} query heads share {num_kv_heads} KV heads\n(groups of {group}: repeat_interleave)")
    return _finish(fig, show)


def plot_kv_cache_memory(configs: dict, max_tokens: int = 8192, bytes_per_value: int = 2, show: bool = True):
    """KV-cache size against the number of cached tokens, one line per {label: DecoderConfig}.

    Size = 2 (keys and values) x layers x kv_heads x head_dim x tokens x bytes per value (2 for bf16/fp16).
    """
    tokens = np.linspace(0, max_tokens, 64)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for label, cfg in configs.items():
        per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * bytes_per_value
        ax.plot(tokens, tokens * per_token / 2**20, label=f"{label}: {per_token / 1024:.1f} KiB per token")
    ax.set_xlabel("tokens in the cache (prompt + generated, one sequence)")
    ax.set_ylabel("MiB")
    ax.set_title(f"KV-cache memory ({8 * bytes_per_value}-bit values)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, show)


def plot_activations(show: bool = True):
    """SiLU (SwiGLU's gate), GELU and ReLU side by side."""
    x = torch.linspace(-5, 5, 201)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, fn in (("ReLU", torch.relu), ("GELU", torch.nn.functional.gelu), ("SiLU = x * sigmoid(x)",
                                                                           torch.nn.functional.silu)):
        ax.plot(x.numpy(), fn(x).numpy(), label=name)
    ax.axhline(0, color="black", lw=0.5)
    ax.axvline(0, color="black", lw=0.5)
    ax.set_title("gate activations: SiLU is smooth and lets a little negative signal through")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _finish(fig, show)


def plot_sampling(distributions: dict, token_name: Callable[[int], str] | None = None, top: int = 12,
                  show: bool = True):
    """One bar chart per setting {label: probabilities (V,)}, over the `top` tokens of the first setting.

    `token_name(id)` labels the bars (e.g. lambda i: tokenizer.decode([i])); token ids otherwise.
    """
    items = [(label, p.detach().float().cpu()) for label, p in distributions.items()]
    order = torch.argsort(items[0][1], descending=True)[:top]
    names = [repr(token_name(i))[1:-1] if token_name else str(i) for i in order.tolist()]
    fig, axes = plt.subplots(1, len(items), figsize=(3.2 * len(items), 3.4), sharey=True, squeeze=False)
    for ax, (label, probs) in zip(axes[0], items):
        values = probs[order].numpy()
        ax.bar(range(len(order)), values, color=["tab:blue" if v > 0 else "lightgrey" for v in values])
        ax.set_xticks(range(len(order)), names, rotation=70, fontsize=8)
        kept = int((probs > 0).sum())
        ax.set_title(f"{label}\n({kept} token{'s' if kept != 1 else ''} can be drawn)", fontsize=9)
    axes[0][0].set_ylabel("probability")
    return _finish(fig, show)


# ==============================================================================================
# Lesson 04: assembling the VLM


def plot_token_sequence(tokens: list[str], input_ids, labels=None, image_token_id: int | None = None,
                        per_row: int = 14, collapse_images: bool = True, title: str | None = None, show: bool = True):
    """A conversation's tokens as coloured boxes, in reading order: image tokens, trained (labelled) answer
    tokens, and the rest (prompt, template, padding). A run of image tokens is drawn as one wide box with its
    count when `collapse_images`."""
    ids = [int(i) for i in (input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids)]
    trained = [False] * len(ids) if labels is None else [int(x) != -100 for x in
                                                         (labels.tolist() if hasattr(labels, "tolist") else labels)]
    boxes = []  # (text, kind, width)
    i = 0
    while i < len(ids):
        if image_token_id is not None and ids[i] == image_token_id:
            j = i
            while j < len(ids) and ids[j] == image_token_id:
                j += 1
            if collapse_images:
                boxes.append((f"<image> x {j - i}", "image", 3))
            else:
                boxes.extend(("<image>", "image", 1) for _ in range(i, j))
            i = j
            continue
        text = tokens[i].replace("\n", "\\n").replace("Ġ", "␣").replace("Ċ", "\\n")
        boxes.append((text if len(text) <= 12 else text[:11] + "…", "answer" if trained[i] else "text", 1))
        i += 1
    colours = {"image": "#f4a261", "answer": "#8ecae6", "text": "#e9ecef"}
    rows, x, placed = 0, 0, []
    for text, kind, width in boxes:
        if x + width > per_row:
            rows, x = rows + 1, 0
        placed.append((x, rows, text, kind, width))
        x += width
    fig, ax = plt.subplots(figsize=(per_row * 0.85, 0.55 * (rows + 1) + 0.8))
    for x, row, text, kind, width in placed:
        ax.add_patch(plt.Rectangle((x + 0.04, -row - 0.9), width - 0.08, 0.8, color=colours[kind], ec="grey", lw=0.5))
        ax.text(x + width / 2, -row - 0.5, text, ha="center", va="center", fontsize=7, family="monospace")
    ax.set_xlim(0, per_row)
    ax.set_ylim(-rows - 1.05, 0.05)
    ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(handles, ["image tokens", "trained (label = token)", "not trained (label -100)"], ncol=3, fontsize=8,
              loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return _finish(fig, show)


def plot_embedding_rms(embeds: torch.Tensor, input_ids, image_token_id: int, title: str | None = None,
                       show: bool = True):
    """Root-mean-square size of each position's input vector to the decoder (one sample), image positions
    highlighted: an untrained projector writes vectors of a very different size from the word embeddings."""
    rms = embeds.detach().float().pow(2).mean(-1).sqrt().cpu()
    rms = rms[0] if rms.dim() == 2 else rms
    ids = torch.as_tensor(input_ids)
    ids = ids[0] if ids.dim() == 2 else ids
    is_image = (ids == image_token_id).cpu().numpy()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    positions = np.arange(len(rms))
    ax.bar(positions[~is_image], rms.numpy()[~is_image], color="#adb5bd", label="text token embeddings")
    ax.bar(positions[is_image], rms.numpy()[is_image], color="#f4a261", label="projected image features")
    ax.set_yscale("log")
    ax.set_xlabel("position in the sequence")
    ax.set_ylabel("RMS of the input vector")
    ax.set_title(title or "what the decoder receives, position by position")
    ax.legend(fontsize=8)
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
    ax.set_title("partial credit: 1 agreeing human -> 0.3, 3 -> 0.9, 4 or more -> 1.0")
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


# ==============================================================================================
# Lesson 05: training with QLoRA


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
    from .data.synthetic import gallery

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
