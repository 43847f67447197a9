"""Lesson 01, ViT patching: patchify, conv_to_linear, scaled_dot_product_attention, multi_head_attention, ViTBlock.

References are built on vlm_course.vision (the conv in PatchEmbedding, VisionAttention, VisionBlock).
Mutants are the mistakes learners actually make; tests/test_grading.py proves each one fails these checks.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import VisionConfig
from ...vision import VisionAttention, VisionBlock
from ..core import Case, Exercise, GradingError, Mutant
from ..inputs import load_weights, randn, randomised
from ..registry import register

LESSON = "01"

# ----------------------------------------------------------------------------------------------
# patchify(images, patch_size): (B, C, H, W) -> (B, N, C*p*p), patches row-major, each patch laid out (C, p, p)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Reference. F.unfold cuts exactly the patches a stride-p conv sees, in the conv kernel's (C, p, p) layout."""
    _, _, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image {h}x{w} is not a whole number of {patch_size}px patches")
    return F.unfold(images, kernel_size=patch_size, stride=patch_size).transpose(1, 2)


def _grid(images, p):  # (B, C, H/p, p, W/p, p): axes are (batch, channel, row, y-in-patch, column, x-in-patch)
    b, c, h, w = images.shape
    return images.reshape(b, c, h // p, p, w // p, p)


def _flat(x, images, p):
    return x.reshape(images.shape[0], -1, images.shape[1] * p * p)


def patchify_column_major(images, p):
    return _flat(_grid(images, p).permute(0, 4, 2, 1, 3, 5), images, p)


def patchify_channels_last(images, p):
    return _flat(_grid(images, p).permute(0, 2, 4, 3, 5, 1), images, p)


def patchify_no_permute(images, p):
    return _flat(images, images, p)


def patchify_pixels_transposed(images, p):
    return _flat(_grid(images, p).permute(0, 2, 4, 1, 5, 3), images, p)


def patchify_height_width_swapped(images, p):
    """The grid split as if the image were W x H: (B, C, W/p, p, H/p, p)."""
    b, c, h, w = images.shape
    return _flat(images.reshape(b, c, w // p, p, h // p, p).permute(0, 2, 4, 1, 3, 5), images, p)


def patchify_unfold_not_transposed(images, p):
    """F.unfold is the right tool, but it returns (B, C*p*p, N)."""
    return F.unfold(images, kernel_size=p, stride=p)


register(Exercise(
    name="patchify", lesson=LESSON, reference=patchify,
    description="cut (B, C, H, W) images into (B, N, C*p*p) patch vectors, row-major",
    cases=[
        Case("batch 2, 3x16x16 images, patch 4", lambda: (randn(2, 3, 16, 16, seed=1), 4)),
        Case("batch 3, non-square 3x8x20 images (2x5 grid), patch 4", lambda: (randn(3, 3, 8, 20, seed=2), 4)),
        Case("batch 2, tall 2x12x6 images (4x2 grid), patch 3", lambda: (randn(2, 2, 12, 6, seed=3), 3)),
        Case("float64 images 3x6x9, patch 3 (keep the dtype)",
             lambda: (randn(2, 3, 6, 9, seed=4, dtype=torch.float64), 3)),
        Case("3x10x16 images, patch 4: 10 is not a multiple of 4", lambda: (randn(1, 3, 10, 16, seed=5), 4),
             raises=ValueError),
    ],
    mutants=[
        Mutant("column_major", patchify_column_major,
               "patches come out in column-major order - flatten rows first (patch index = row * columns + column)"),
        Mutant("channels_last", patchify_channels_last,
               "each patch vector is laid out (p, p, C), channels last - lay it out (C, p, p) as the conv kernel is"),
        Mutant("no_permute", patchify_no_permute,
               "you reshaped without permuting: each 'patch' is a run of consecutive pixels, not a p x p square - "
               "view as (B, C, H/p, p, W/p, p) and move the two grid axes to the front"),
        Mutant("pixels_transposed", patchify_pixels_transposed,
               "pixels inside each patch are in column-major order - keep (row in patch, column in patch)"),
        Mutant("height_width_swapped", patchify_height_width_swapped,
               "the grid was split with H and W swapped (fine for square images only) - view as (B, C, H/p, p, W/p, p): "
               "the image's height comes first"),
        Mutant("unfold_not_transposed", patchify_unfold_not_transposed,
               "F.unfold returns (B, C*p*p, N), patches along the last axis - transpose(1, 2) to get (B, N, C*p*p)"),
    ],
))

# ----------------------------------------------------------------------------------------------
# conv_to_linear(conv) -> nn.Linear such that linear(patchify(x, p)) == conv(x) as a (B, N, D) sequence


def conv_to_linear(conv: nn.Conv2d) -> nn.Linear:
    """Reference: a conv with kernel = stride = p is one linear layer applied to every (C, p, p) patch."""
    d = conv.out_channels
    linear = nn.Linear(conv.weight[0].numel(), d, bias=conv.bias is not None, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.reshape(d, -1))
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def _linear_from(weight, bias, dtype):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def conv_to_linear_channels_last(conv):
    return _linear_from(conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1), conv.bias, conv.weight.dtype)


def conv_to_linear_kernel_transposed(conv):
    return _linear_from(conv.weight.transpose(2, 3).reshape(conv.out_channels, -1), conv.bias, conv.weight.dtype)


def conv_to_linear_no_bias(conv):
    return _linear_from(conv.weight.reshape(conv.out_channels, -1), None, conv.weight.dtype)


def conv_to_linear_reshaped_in_out(conv):
    """The weight reshaped to (in, out) = (C*p*p, D), then transposed to (D, C*p*p): right shape, kernels mixed."""
    return _linear_from(conv.weight.reshape(-1, conv.out_channels).t(), conv.bias, conv.weight.dtype)


def conv_to_linear_default_dtype(conv):
    """nn.Linear(...) without dtype=: a float32 layer for a float64 conv."""
    return _linear_from(conv.weight.reshape(conv.out_channels, -1), conv.bias, torch.float32)


def _conv_case(c, d, p, image_shape, seed, dtype=torch.float32):
    def inputs():
        torch.manual_seed(seed)  # nn.Conv2d's own init, seeded; then made fully random
        conv = randomised(nn.Conv2d(c, d, kernel_size=p, stride=p), seed, dtype)
        return conv, randn(*image_shape, seed=seed + 100, dtype=dtype)
    return inputs


def run_conv_to_linear(impl, conv, images):
    """Apply the learner's linear layer to the reference patches: the result must be the conv's output."""
    linear = impl(conv)
    if not callable(linear):
        raise GradingError(f"conv_to_linear should return an nn.Linear, got {type(linear).__name__}")
    weight = getattr(linear, "weight", None)
    expected = (conv.out_channels, conv.weight[0].numel())
    if isinstance(weight, torch.Tensor) and tuple(weight.shape) != expected:
        raise GradingError(f"the linear layer's weight is {tuple(weight.shape)}, expected (D, C*p*p) = {expected}")
    if isinstance(weight, torch.Tensor) and weight.dtype != conv.weight.dtype:
        raise GradingError(f"the linear layer is {weight.dtype}, the conv {conv.weight.dtype}")
    return linear(patchify(images, conv.kernel_size[0]))


register(Exercise(
    name="conv_to_linear", lesson=LESSON, reference=conv_to_linear, call=run_conv_to_linear,
    description="the linear layer that equals a stride-p patch conv",
    cases=[
        Case("conv 3->8 channels, patch 4, batch 2 non-square 8x12 images", _conv_case(3, 8, 4, (2, 3, 8, 12), 11)),
        Case("conv 2->5 channels, patch 3, batch 3 tall 9x6 images", _conv_case(2, 5, 3, (3, 2, 9, 6), 12)),
        Case("float64 conv 3->4, patch 2", _conv_case(3, 4, 2, (2, 3, 4, 6), 13, torch.float64)),
    ],
    mutants=[
        Mutant("channels_last", conv_to_linear_channels_last,
               "the kernel was flattened as (p, p, C) - flatten it as (C, p, p), the layout of each patch vector "
               "(conv.weight.reshape(D, -1))"),
        Mutant("kernel_transposed", conv_to_linear_kernel_transposed,
               "the kernel's height and width are swapped - flatten conv.weight as it is, without transposing"),
        Mutant("no_bias", conv_to_linear_no_bias, "the output is off by a constant per channel - copy the conv's bias"),
        Mutant("reshaped_in_out", conv_to_linear_reshaped_in_out,
               "the weight was reshaped to (C*p*p, D) and transposed, which mixes the kernels - conv.weight is "
               "(D, C, p, p), D first already: conv.weight.reshape(D, -1) is the (out, in) matrix nn.Linear keeps"),
        Mutant("default_dtype", conv_to_linear_default_dtype,
               "keep the conv's dtype: nn.Linear(..., dtype=conv.weight.dtype)"),
    ],
))

# ----------------------------------------------------------------------------------------------
# scaled_dot_product_attention(q, k, v) = softmax(q k^T / sqrt(d)) v over any leading dims


def scaled_dot_product_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def _attention(q, k, v, scale, dim=-1):
    return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=dim) @ v


def sdpa_no_scale(q, k, v):
    return _attention(q, k, v, 1.0)


def sdpa_scale_by_d(q, k, v):
    return _attention(q, k, v, 1.0 / q.shape[-1])


def sdpa_softmax_over_queries(q, k, v):
    return _attention(q, k, v, q.shape[-1] ** -0.5, dim=-2)


def sdpa_times_sqrt_d(q, k, v):
    return _attention(q, k, v, q.shape[-1] ** 0.5)


def sdpa_scale_by_key_count(q, k, v):
    return _attention(q, k, v, k.shape[-2] ** -0.5)


def sdpa_scale_by_value_dim(q, k, v):
    return _attention(q, k, v, v.shape[-1] ** -0.5)


def _qkv(q_shape, kv_len, v_dim, seed, dtype=torch.float32):
    *lead, _, d = q_shape
    return lambda: (randn(*q_shape, seed=seed, dtype=dtype), randn(*lead, kv_len, d, seed=seed + 1, dtype=dtype),
                    randn(*lead, kv_len, v_dim, seed=seed + 2, dtype=dtype))


register(Exercise(
    name="scaled_dot_product_attention", lesson=LESSON, reference=scaled_dot_product_attention,
    description="softmax(q k^T / sqrt(d)) v",
    cases=[
        Case("batch 2, 3 heads, 5 tokens, head_dim 8", _qkv((2, 3, 5, 8), 5, 8, 21)),
        Case("4 queries attending to 7 keys, value dim 5 != key dim 6", _qkv((2, 1, 4, 6), 7, 5, 22)),
        Case("no head axis: (3, 5, 8) inputs", _qkv((3, 5, 8), 5, 8, 23)),
        Case("float64, batch 1, 5 heads, head_dim 4", _qkv((1, 5, 6, 4), 6, 4, 24, torch.float64)),
    ],
    mutants=[
        Mutant("no_scale", sdpa_no_scale,
               "no 1/sqrt(d) scaling: divide the scores q k^T by sqrt(head_dim) before the softmax"),
        Mutant("scale_by_d", sdpa_scale_by_d, "scores divided by d - divide by sqrt(d) instead"),
        Mutant("softmax_over_queries", sdpa_softmax_over_queries,
               "softmax over the wrong axis: each query's weights over the keys must sum to 1 (softmax(dim=-1))"),
        Mutant("times_sqrt_d", sdpa_times_sqrt_d, "scores multiplied by sqrt(d) - divide by it"),
        Mutant("scale_by_key_count", sdpa_scale_by_key_count,
               "scores divided by the square root of the number of keys - the scale is 1/sqrt(d), d = q.shape[-1], "
               "the size of each query and key vector"),
        Mutant("scale_by_value_dim", sdpa_scale_by_value_dim,
               "scores divided by the square root of the value width - d is the query/key width q.shape[-1] "
               "(the values may be wider or narrower)"),
    ],
))

# ----------------------------------------------------------------------------------------------
# multi_head_attention(x, attn): our own forward pass through a VisionAttention module's weights


def multi_head_attention(x, attn: VisionAttention):
    return attn(x)


def _mha_variant(x, attn, *, split_ok=True, merge_ok=True, project=True, scaled=True, scale_width=False,
                 shared_qk=False):
    b, n, dim = x.shape
    h, hd = attn.num_heads, dim // attn.num_heads

    def split(t):
        return t.view(b, n, h, hd).transpose(1, 2) if split_ok else t.reshape(b, h, n, hd)

    q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x) if not shared_qk else attn.q_proj(x)), split(attn.v_proj(x))
    out = _attention(q, k, v, (dim if scale_width else hd) ** -0.5 if scaled else 1.0)
    out = out.transpose(1, 2).reshape(b, n, dim) if merge_ok else out.reshape(b, n, dim)
    return attn.out_proj(out) if project else out


def _attention_case(hidden, heads, batch, tokens, seed, dtype=torch.float32):
    def inputs():
        attn = randomised(VisionAttention(VisionConfig(hidden_size=hidden, num_heads=heads)), seed, dtype)
        return randn(batch, tokens, hidden, seed=seed + 100, dtype=dtype), attn
    return inputs


_SPLIT_HINT = ("heads split with a plain reshape to (B, heads, N, head_dim), which mixes tokens into heads - "
               "view as (B, N, heads, head_dim), then transpose(1, 2) (and transpose back before merging)")

register(Exercise(
    name="multi_head_attention", lesson=LESSON, reference=multi_head_attention,
    description="split into heads, attend, merge, project", uses=("scaled_dot_product_attention",),
    cases=[
        Case("batch 2, 7 tokens, width 48, 3 heads", _attention_case(48, 3, 2, 7, 31)),
        Case("batch 3, 4 tokens, width 40, 5 heads", _attention_case(40, 5, 3, 4, 32)),
        Case("float64, batch 2, 6 tokens, width 32, 4 heads", _attention_case(32, 4, 2, 6, 33, torch.float64)),
    ],
    mutants=[
        Mutant("split_without_transpose", functools.partial(_mha_variant, split_ok=False), _SPLIT_HINT),
        # The same mistake, undone the same way on the way out: reshape to (B, heads, N, hd), merge with a plain
        # reshape back to (B, N, D). Consistent, and still wrong: the heads saw mixed-up tokens.
        Mutant("split_and_merge_by_reshape", functools.partial(_mha_variant, split_ok=False, merge_ok=False),
               _SPLIT_HINT),
        Mutant("merge_without_transpose", functools.partial(_mha_variant, merge_ok=False),
               "heads merged without transposing back - (B, heads, N, hd).transpose(1, 2) before reshaping to (B, N, D)"),
        Mutant("no_out_proj", functools.partial(_mha_variant, project=False),
               "the merged heads were not passed through attn.out_proj"),
        Mutant("no_scale", functools.partial(_mha_variant, scaled=False),
               "attention scores were not scaled by 1/sqrt(head_dim)"),
        Mutant("scale_by_width", functools.partial(_mha_variant, scale_width=True),
               "scores scaled by 1/sqrt(D), the full width - each head attends with its own head_dim = D / heads: "
               "scale by 1/sqrt(D / heads)"),
        Mutant("keys_from_q_proj", functools.partial(_mha_variant, shared_qk=True),
               "the keys were made with q_proj - keys come from attn.k_proj(x) (and values from attn.v_proj(x))"),
    ],
))

# ----------------------------------------------------------------------------------------------
# ViTBlock: the learner writes forward() of a pre-LN block with VisionBlock's submodule names


class _PostLN(VisionBlock):
    def forward(self, x):
        x = self.layer_norm1(x + self.self_attn(x))
        return self.layer_norm2(x + self.mlp(x))


class _NoAttentionResidual(VisionBlock):
    def forward(self, x):
        x = self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _ResidualFromNormalised(VisionBlock):
    def forward(self, x):
        x = self.layer_norm1(x)
        x = x + self.self_attn(x)
        h = self.layer_norm2(x)
        return h + self.mlp(h)


class _ExactGelu(VisionBlock):
    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.layer_norm2(x))))


class _NoMlpResidual(VisionBlock):
    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return self.mlp(self.layer_norm2(x))


class _Parallel(VisionBlock):
    def forward(self, x):
        return x + self.self_attn(self.layer_norm1(x)) + self.mlp(self.layer_norm2(x))


class _Relu(VisionBlock):
    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp.fc2(F.relu(self.mlp.fc1(self.layer_norm2(x))))


class _OneLayerNorm(VisionBlock):
    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm1(x))


def _block_case(hidden, heads, mlp, batch, tokens, seed, dtype=torch.float32):
    def inputs():
        cfg = VisionConfig(hidden_size=hidden, num_heads=heads, intermediate_size=mlp)
        state = randomised(VisionBlock(cfg), seed).state_dict()
        return cfg, state, randn(batch, tokens, hidden, seed=seed + 100, dtype=dtype)
    return inputs


def run_block(cls, cfg, state, x):
    block = load_weights(cls(cfg), state, "ViTBlock", "VisionBlock")
    return block.to(x.dtype).eval()(x)


register(Exercise(
    name="ViTBlock", lesson=LESSON, reference=VisionBlock, call=run_block,
    description="pre-LN transformer block: x + attn(LN1(x)), then x + MLP(LN2(x))", uses=("multi_head_attention",),
    cases=[
        Case("batch 2, 5 tokens, width 48, 3 heads, MLP 96", _block_case(48, 3, 96, 2, 5, 41)),
        Case("batch 1, 9 tokens, width 40, 5 heads, MLP 64", _block_case(40, 5, 64, 1, 9, 42)),
        Case("float64, batch 2, 4 tokens, width 32, 2 heads", _block_case(32, 2, 64, 2, 4, 43, torch.float64),
             atol=1e-10, rtol=1e-10),
    ],
    mutants=[
        Mutant("post_ln", _PostLN,
               "this is a post-LN block (LayerNorm after the residual add) - ViT and SigLIP normalise *before* "
               "each sub-layer: x = x + attn(layer_norm1(x))"),
        Mutant("no_attention_residual", _NoAttentionResidual,
               "the attention output replaced x instead of being added to it - keep the residual: x = x + attn(...)"),
        Mutant("residual_from_normalised", _ResidualFromNormalised,
               "the residual adds to the *normalised* x - the residual stream stays unnormalised: "
               "x = x + attn(layer_norm1(x))"),
        Mutant("exact_gelu", _ExactGelu,
               "exact GELU in the MLP - SigLIP uses the tanh approximation: F.gelu(h, approximate='tanh')"),
        Mutant("one_layer_norm", _OneLayerNorm,
               "layer_norm1 was used before the MLP too - the MLP has its own layer_norm2"),
        Mutant("no_mlp_residual", _NoMlpResidual,
               "the MLP output replaced x instead of being added to it - keep the residual: x = x + mlp(...)"),
        Mutant("parallel", _Parallel,
               "attention and MLP both read the block's input (a parallel block) - ViT runs them in sequence: the MLP "
               "reads x after the attention residual has been added"),
        Mutant("relu", _Relu, "ReLU in the MLP - SigLIP uses GELU, the tanh approximation: F.gelu(h, approximate='tanh')"),
    ],
))
