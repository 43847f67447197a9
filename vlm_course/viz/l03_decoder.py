"""Lesson 03, the decoder: RoPE tables and scores, causal grouped-query attention, KV-cache memory,
activation functions, and sampling."""

from __future__ import annotations

from typing import Callable

import matplotlib.pyplot as plt
import numpy as np
import torch

from .common import _finish


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
