"""Lesson 03, the decoder: rms_norm, rope_cos_sin, apply_rope, grouped_query_attention, swiglu, KVCache,
sampling_probs.

References are built on vlm_course.decoder (RMSNorm's maths, RotaryEmbedding, apply_rope, repeat_kv and
build_attention_mask, SwiGLU, KVCache, sample_next_token's filtering). Mutants are the mistakes learners
actually make; tests/test_grading.py proves each one fails these checks, and tests/test_grading_l03_l04.py
that the references agree with the library.

Why one file past 500 lines: it is lesson 03's grading, one file per lesson as the notebooks are: every
exercise's reference, cases, mutants and hints side by side, so a hint can be read next to the mistake it names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...config import DecoderConfig
from ...decoder import Decoder, KVCache, RotaryEmbedding, SwiGLU, repeat_kv
from ...decoder import apply_rope as _apply_rope
from ..core import Case, Exercise, GradingError, Mutant
from ..inputs import randn, randomised
from ..registry import register

LESSON = "03"

# ----------------------------------------------------------------------------------------------
# rms_norm(x, weight, eps): x / sqrt(mean(x^2) + eps) * weight over the last axis


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Reference: exactly vlm_course.decoder.RMSNorm.forward (statistics in float32, as the checkpoint expects)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rms_layer_norm(x, weight, eps=1e-5):
    return (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + eps) * weight


def rms_eps_outside_sqrt(x, weight, eps=1e-5):
    return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * weight


def rms_no_weight(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rms_sum_not_mean(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps) * weight


def rms_all_axes(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean() + eps) * weight


def rms_divided_by_std(x, weight, eps=1e-5):
    return x / (x.std(-1, keepdim=True) + eps) * weight


def rms_weight_before_norm(x, weight, eps=1e-5):
    y = x * weight
    return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)


def _rms_case(shape, seed, eps=1e-5, scale=1.0, offset=0.5, dtype=torch.float32):
    def inputs():
        x = randn(*shape, seed=seed, dtype=dtype, scale=scale) + offset * scale  # a non-zero mean: LayerNorm != RMSNorm
        weight = 1 + 0.3 * randn(shape[-1], seed=seed + 1, dtype=dtype)
        return x, weight, eps
    return inputs


register(Exercise(
    name="rms_norm", lesson=LESSON, reference=rms_norm,
    description="x / sqrt(mean(x^2) + eps) * weight, over the last axis",
    cases=[
        Case("batch 2, 5 tokens, width 16, inputs with a non-zero mean", _rms_case((2, 5, 16), 101)),
        Case("4-D input (3, 4, 7, 12): normalise the last axis only", _rms_case((3, 4, 7, 12), 102)),
        Case("tiny activations (about 1e-3) where eps = 1e-5 matters", _rms_case((2, 6, 10), 103, scale=1e-3)),
        Case("a large eps = 0.5", _rms_case((2, 3, 8), 104, eps=0.5)),
        Case("float64, batch 3, width 9 (keep the dtype)", _rms_case((3, 4, 9), 105, dtype=torch.float64)),
    ],
    mutants=[
        Mutant("layer_norm", rms_layer_norm,
               "this is LayerNorm: RMSNorm does not subtract the mean - x / sqrt(mean(x^2) + eps) * weight"),
        Mutant("no_weight", rms_no_weight, "the learned per-channel `weight` was not applied"),
        Mutant("sum_not_mean", rms_sum_not_mean,
               "divided by the root of the *sum* of squares - RMSNorm uses the *mean*: x.pow(2).mean(-1, keepdim=True)"),
        Mutant("all_axes", rms_all_axes,
               "the mean of squares was taken over the whole tensor - take it per token, over the last axis "
               "(mean(-1, keepdim=True))"),
        Mutant("eps_outside_sqrt", rms_eps_outside_sqrt,
               "eps was added after the square root - add it inside: 1 / sqrt(mean(x^2) + eps), as Llama and SmolLM2 "
               "do (it matters for small activations)"),
        Mutant("divided_by_std", rms_divided_by_std,
               "divided by the standard deviation (x.std), which subtracts the mean first - RMSNorm divides by the "
               "root mean square: sqrt(mean(x^2) + eps)"),
        Mutant("weight_before_norm", rms_weight_before_norm,
               "the weight was applied before normalising, so the normalisation undoes it - normalise x, then "
               "multiply by weight"),
    ],
))

# ----------------------------------------------------------------------------------------------
# rope_cos_sin(position_ids, head_dim, theta) -> cos, sin of shape (B, T, head_dim), "rotate half" layout


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: vlm_course.decoder.RotaryEmbedding (frequency i = theta^(-2i/d), table repeated as [f, f])."""
    return RotaryEmbedding(head_dim, theta)(position_ids)


def _angles(position_ids, inv_freq):
    return position_ids.float()[..., None] * inv_freq


def rope_interleaved_table(position_ids, head_dim, theta):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = _angles(position_ids, inv_freq).repeat_interleave(2, dim=-1)
    return angles.cos(), angles.sin()


def rope_exponent_without_2(position_ids, head_dim, theta):
    inv_freq = 1.0 / theta ** (torch.arange(head_dim // 2, dtype=torch.float32) / head_dim)
    angles = torch.cat([_angles(position_ids, inv_freq)] * 2, dim=-1)
    return angles.cos(), angles.sin()


def rope_not_inverted(position_ids, head_dim, theta):
    freq = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.cat([_angles(position_ids, freq)] * 2, dim=-1)
    return angles.cos(), angles.sin()


def rope_ignores_position_ids(position_ids, head_dim, theta):
    """Positions 0..T-1 for every row, whatever position_ids says."""
    return rope_cos_sin(torch.arange(position_ids.shape[1]).expand_as(position_ids), head_dim, theta)


def rope_one_frequency_per_dim(position_ids, head_dim, theta):
    """d frequencies, one per dimension, instead of d/2 used twice."""
    inv_freq = 1.0 / theta ** (torch.arange(head_dim, dtype=torch.float32) / head_dim)
    angles = _angles(position_ids, inv_freq)
    return angles.cos(), angles.sin()


def rope_cos_sin_swapped(position_ids, head_dim, theta):
    cos, sin = rope_cos_sin(position_ids, head_dim, theta)
    return sin, cos


def _positions_case(rows, head_dim, theta):
    return lambda: (torch.tensor(rows), head_dim, theta)


register(Exercise(
    name="rope_cos_sin", lesson=LESSON, reference=rope_cos_sin,
    description="RoPE's cos and sin tables (B, T, head_dim) in the rotate-half layout",
    cases=[
        Case("batch 2, positions 0..6, head_dim 8, theta 10000", _positions_case([list(range(7))] * 2, 8, 10000.0)),
        Case("left-padded batch: positions [0,0,0,1,2,3] and [0..5], head_dim 16, theta 100000 (SmolLM2's)",
             _positions_case([[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]], 16, 100000.0)),
        Case("far positions 1000..1004, head_dim 6 (3 frequencies), theta 500",
             _positions_case([list(range(1000, 1005))], 6, 500.0)),
    ],
    mutants=[
        Mutant("interleaved_table", rope_interleaved_table,
               "the table is interleaved [f0, f0, f1, f1, ...] (adjacent pairs, as in the RoPE paper) - SmolLM2's "
               "checkpoint pairs dimension i with i + d/2, so repeat the angles as two halves: cat([a, a], dim=-1)"),
        Mutant("exponent_without_2", rope_exponent_without_2,
               "wrong frequencies: frequency i is theta^(-2i/d) (i = 0..d/2-1), i.e. "
               "1 / theta ** (torch.arange(0, d, 2) / d) - you used theta^(-i/d)"),
        Mutant("not_inverted", rope_not_inverted,
               "the frequencies grow with i: use their inverse, 1 / theta ** (arange(0, d, 2) / d), so that the "
               "first pair turns fastest and the last one slowest"),
        Mutant("cos_sin_swapped", rope_cos_sin_swapped, "cos and sin are swapped: return (cos, sin)"),
        Mutant("ignores_position_ids", rope_ignores_position_ids,
               "the angles use positions 0..T-1 for every row - use position_ids: a left-padded row starts later"),
        Mutant("one_frequency_per_dim", rope_one_frequency_per_dim,
               "one frequency per dimension (d of them) - there is one per pair, d/2 frequencies theta^(-2i/d), "
               "and the table repeats them for the two halves: cat([a, a], dim=-1)"),
    ],
))

# ----------------------------------------------------------------------------------------------
# apply_rope(x, cos, sin): rotate every (i, i + d/2) pair of x (B, H, T, d) by its position's angle


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _apply_rope(x, cos, sin)


def _rope_with(rotate):
    def rope(x, cos, sin):
        cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
        return x * cos + rotate(x) * sin
    return rope


def _rotate_adjacent(x):
    return torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)


def _rotate_half_wrong_sign(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x2, -x1], dim=-1)


def _rotate_half_no_minus(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x2, x1], dim=-1)


def rope_sin_cos_swapped(x, cos, sin):
    return _apply_rope(x, sin, cos)


def rope_sin_times_x(x, cos, sin):
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + x * sin


def rope_float32_out(x, cos, sin):
    return x.float() * cos.unsqueeze(1) + _rotate_half(x.float()) * sin.unsqueeze(1)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _rope_case(batch, heads, positions, head_dim, theta, seed, dtype=torch.float32):
    def inputs():
        position_ids = torch.tensor(positions).expand(batch, -1) if isinstance(positions[0], int) else torch.tensor(positions)
        cos, sin = RotaryEmbedding(head_dim, theta)(position_ids)
        return randn(batch, heads, position_ids.shape[1], head_dim, seed=seed, dtype=dtype), cos, sin
    return inputs


register(Exercise(
    name="apply_rope", lesson=LESSON, reference=apply_rope,
    description="rotate each (i, i + d/2) pair of q or k by its position's angle",
    cases=[
        Case("batch 2, 3 heads, positions 0..4, head_dim 8", _rope_case(2, 3, list(range(5)), 8, 10000.0, 111)),
        Case("batch 2, 9 heads, left-padded positions, head_dim 16",
             _rope_case(2, 9, [[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]], 16, 100000.0, 112)),
        Case("float64, batch 1, 5 heads, positions 40..45, head_dim 6",
             _rope_case(1, 5, list(range(40, 46)), 6, 500.0, 113, torch.float64)),
    ],
    mutants=[
        Mutant("adjacent_pairs", _rope_with(_rotate_adjacent),
               "you rotated adjacent pairs (0,1), (2,3), ... - SmolLM2 (and every Llama checkpoint in transformers) "
               "pairs dimension i with i + d/2: rotate_half(x) = cat([-x2, x1]) with x1, x2 = the two halves"),
        Mutant("rotate_half_wrong_sign", _rope_with(_rotate_half_wrong_sign),
               "rotate_half has the minus sign on the wrong half: it is cat([-x2, x1], dim=-1) (a +90 degree turn "
               "of each (x1, x2) pair)"),
        Mutant("rotate_half_no_minus", _rope_with(_rotate_half_no_minus),
               "rotate_half lost its minus sign: cat([-x2, x1], dim=-1) - without it the map is not a rotation"),
        Mutant("sin_cos_swapped", rope_sin_cos_swapped,
               "cos and sin are swapped: x * cos + rotate_half(x) * sin"),
        Mutant("sin_times_x", rope_sin_times_x,
               "the sin term multiplied x itself - it multiplies rotate_half(x), the other half of each pair: "
               "x * cos + rotate_half(x) * sin"),
        Mutant("float32_out", rope_float32_out,
               "the result is float32: keep x's dtype (cast the tables with .to(x.dtype), not x to float32)"),
    ],
))

# ----------------------------------------------------------------------------------------------
# grouped_query_attention(q, k, v): causal GQA; the Tq queries are the *last* Tq of the Tk positions


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference: repeat_kv (repeat_interleave), a causal mask with the cache offset (as build_attention_mask), SDPA."""
    n_rep = q.shape[1] // k.shape[1]
    q_len, kv_len = q.shape[2], k.shape[2]
    q_pos = torch.arange(kv_len - q_len, kv_len)[:, None]  # the queries are the last q_len positions
    mask = torch.arange(kv_len)[None, :] <= q_pos  # True where a query may look: keys at or before its position
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask)


def _gqa(q, k, v, *, repeat="interleave", offset=True, diagonal=1, scaled=True, causal=True, fill=float("-inf"),
         softmax_dim=-1):
    n_rep = q.shape[1] // k.shape[1]
    if repeat == "interleave":
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    else:
        k, v = k.repeat(1, n_rep, 1, 1), v.repeat(1, n_rep, 1, 1)
    q_len, kv_len = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-2, -1)
    if scaled:
        scores = scores / q.shape[-1] ** 0.5
    if causal:
        q_pos = torch.arange(kv_len - q_len, kv_len) if offset else torch.arange(q_len)
        hidden = torch.arange(kv_len)[None, :] >= q_pos[:, None] + diagonal  # True: this key is in the future
        scores = scores.masked_fill(hidden, fill)
    return scores.softmax(softmax_dim) @ v


def gqa_repeat_tiled(q, k, v):
    return _gqa(q, k, v, repeat="tile")


def gqa_mask_hides_self(q, k, v):
    return _gqa(q, k, v, diagonal=0)


def gqa_mask_one_ahead(q, k, v):
    return _gqa(q, k, v, diagonal=2)


def gqa_no_mask(q, k, v):
    return _gqa(q, k, v, causal=False)


def gqa_no_scale(q, k, v):
    return _gqa(q, k, v, scaled=False)


def gqa_ignores_cache_offset(q, k, v):
    return _gqa(q, k, v, offset=False)


def gqa_mask_filled_with_zero(q, k, v):
    return _gqa(q, k, v, fill=0.0)


def gqa_softmax_over_queries(q, k, v):
    return _gqa(q, k, v, softmax_dim=-2)


def _gqa_case(batch, heads, kv_heads, q_len, kv_len, head_dim, seed, dtype=torch.float32):
    return lambda: (randn(batch, heads, q_len, head_dim, seed=seed, dtype=dtype),
                    randn(batch, kv_heads, kv_len, head_dim, seed=seed + 1, dtype=dtype),
                    randn(batch, kv_heads, kv_len, head_dim, seed=seed + 2, dtype=dtype))


register(Exercise(
    name="grouped_query_attention", lesson=LESSON, reference=grouped_query_attention,
    description="causal attention where groups of query heads share one key/value head",
    cases=[
        Case("batch 2, 9 query heads / 3 KV heads (SmolLM2's ratio 3), 6 tokens, head_dim 8",
             _gqa_case(2, 9, 3, 6, 6, 8, 121)),
        Case("batch 3, 6 query heads / 2 KV heads, 5 tokens, head_dim 4", _gqa_case(3, 6, 2, 5, 5, 4, 122)),
        Case("on top of a cache: 3 new queries, 7 keys (4 cached), 6 query heads / 3 KV heads",
             _gqa_case(2, 6, 3, 3, 7, 8, 123)),
        Case("one new token attending to 6 keys, 5 query heads / 1 KV head (multi-query)",
             _gqa_case(2, 5, 1, 1, 6, 4, 124)),
        Case("float64, 3 heads / 3 KV heads (plain multi-head), 4 tokens",
             _gqa_case(2, 3, 3, 4, 4, 6, 125, torch.float64)),
    ],
    mutants=[
        Mutant("repeat_tiled", gqa_repeat_tiled,
               "KV heads were repeated as a tile (0,1,2,0,1,2,...) - query heads 0..n_rep-1 share KV head 0, so "
               "repeat each KV head n_rep times in a row: k.repeat_interleave(n_rep, dim=1) (not k.repeat)"),
        Mutant("mask_hides_self", gqa_mask_hides_self,
               "the causal mask also hides each token from itself (mask off by one: the first token sees no key "
               "at all, softmax over nothing gives NaN) - a query may attend to keys at positions <= its own"),
        Mutant("mask_one_ahead", gqa_mask_one_ahead,
               "the causal mask is off by one: each query also sees the next token - use torch.triu(..., "
               "diagonal=1) to hide only keys strictly in the future"),
        Mutant("no_mask", gqa_no_mask,
               "no causal mask: every token sees the future - hide keys at positions after the query's"),
        Mutant("no_scale", gqa_no_scale, "attention scores were not scaled by 1/sqrt(head_dim)"),
        Mutant("ignores_cache_offset", gqa_ignores_cache_offset,
               "the mask ignores the cache: when Tq < Tk the queries are the *last* Tq positions (query i is at "
               "position Tk - Tq + i), so each sees every cached key and the new keys up to itself"),
        Mutant("mask_filled_with_zero", gqa_mask_filled_with_zero,
               "the hidden scores were set to 0, not -inf: exp(0) = 1, so future keys still get weight - fill with "
               "float('-inf') (or pass a boolean attn_mask to F.scaled_dot_product_attention)"),
        Mutant("softmax_over_queries", gqa_softmax_over_queries,
               "softmax over the wrong axis: each query's weights over the keys must sum to 1 (softmax(dim=-1))"),
    ],
))

# ----------------------------------------------------------------------------------------------
# swiglu(x, mlp): down(silu(gate(x)) * up(x)) with the weights of a vlm_course.decoder.SwiGLU


def swiglu(x: torch.Tensor, mlp: SwiGLU) -> torch.Tensor:
    return mlp(x)


def swiglu_gate_up_swapped(x, mlp):
    return mlp.down_proj(F.silu(mlp.up_proj(x)) * mlp.gate_proj(x))


def swiglu_gelu(x, mlp):
    return mlp.down_proj(F.gelu(mlp.gate_proj(x)) * mlp.up_proj(x))


def swiglu_sigmoid(x, mlp):
    return mlp.down_proj(torch.sigmoid(mlp.gate_proj(x)) * mlp.up_proj(x))


def swiglu_silu_after_product(x, mlp):
    return mlp.down_proj(F.silu(mlp.gate_proj(x) * mlp.up_proj(x)))


def swiglu_no_up(x, mlp):
    return mlp.down_proj(F.silu(mlp.gate_proj(x)))


def swiglu_relu(x, mlp):
    return mlp.down_proj(F.relu(mlp.gate_proj(x)) * mlp.up_proj(x))


def _swiglu_case(hidden, intermediate, shape, seed, dtype=torch.float32):
    def inputs():
        cfg = DecoderConfig(hidden_size=hidden, intermediate_size=intermediate, num_heads=1, num_kv_heads=1, head_dim=2)
        return randn(*shape, hidden, seed=seed + 100, dtype=dtype), randomised(SwiGLU(cfg), seed, dtype)
    return inputs


register(Exercise(
    name="swiglu", lesson=LESSON, reference=swiglu,
    description="down_proj(silu(gate_proj(x)) * up_proj(x))",
    cases=[
        Case("batch 2, 5 tokens, width 12, intermediate 20", _swiglu_case(12, 20, (2, 5), 131)),
        Case("batch 3, 4 tokens, width 8, intermediate 24", _swiglu_case(8, 24, (3, 4), 132)),
        Case("float64, batch 2, 3 tokens, width 6, intermediate 10", _swiglu_case(6, 10, (2, 3), 133, torch.float64)),
    ],
    mutants=[
        Mutant("gate_up_swapped", swiglu_gate_up_swapped,
               "gate and up are swapped: the SiLU goes on gate_proj(x), which then multiplies up_proj(x)"),
        Mutant("gelu", swiglu_gelu, "GELU instead of SiLU: Llama and SmolLM2 use F.silu (x * sigmoid(x))"),
        Mutant("sigmoid", swiglu_sigmoid,
               "sigmoid instead of SiLU: the gate is silu(g) = g * sigmoid(g) (that is what makes it 'Swish'-GLU)"),
        Mutant("silu_after_product", swiglu_silu_after_product,
               "the SiLU was applied to the product - apply it to gate_proj(x) only, then multiply by up_proj(x)"),
        Mutant("no_up", swiglu_no_up,
               "up_proj is missing: silu(gate_proj(x)) gates up_proj(x), elementwise, before down_proj"),
        Mutant("relu", swiglu_relu, "ReLU instead of SiLU: Llama and SmolLM2 use F.silu (x * sigmoid(x))"),
    ],
))

# ----------------------------------------------------------------------------------------------
# KVCache: the learner writes `seq_len` and `update`; checked by running a real (tiny) decoder with it


class _CheckedCache:
    """Stands between the decoder and the learner's cache and says exactly when the cache misbehaves."""

    def __init__(self, cache, layers: int):
        self.cache, self.stored = cache, [0] * layers

    @property
    def seq_len(self) -> int:
        return self.cache.seq_len

    def update(self, layer, k, v):
        try:
            result = self.cache.update(layer, k, v)
        except NotImplementedError:
            raise
        except Exception as err:  # noqa: BLE001 - say which call failed, in words the learner can act on
            raise GradingError(f"update(layer={layer}, k, v) with {self.stored[layer]} cached + {k.shape[2]} new "
                               f"tokens of shape {tuple(k.shape)} raised {type(err).__name__}: {err}") from err
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise GradingError("update(layer, k, v) should return a pair (all keys, all values)")
        expected = (k.shape[0], k.shape[1], self.stored[layer] + k.shape[2], k.shape[3])
        for what, tensor in zip(("keys", "values"), result):
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != expected:
                got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise GradingError(
                    f"after {self.stored[layer]} cached + {k.shape[2]} new tokens, update returned {what} of shape "
                    f"{got}, expected (batch, kv_heads, cached + new, head_dim) = {expected} "
                    f"(and seq_len now says {self.cache.seq_len})")
        self.stored[layer] += k.shape[2]
        return result


_CACHE_CFG = DecoderConfig(vocab_size=50, hidden_size=72, intermediate_size=48, num_layers=2, num_heads=9,
                           num_kv_heads=3, rope_theta=10000.0, max_position_embeddings=64)


def _cache_case(batch, schedule, seed):
    def inputs():
        torch.manual_seed(seed)
        decoder = randomised(Decoder(_CACHE_CFG), seed)
        ids = torch.randint(0, _CACHE_CFG.vocab_size, (batch, sum(schedule)), generator=torch.Generator().manual_seed(seed))
        return decoder, ids, schedule
    return inputs


def run_cache(cls, decoder, ids, schedule):
    """Feed `ids` to the decoder in chunks (prompt, then new tokens) through the cache; return all logits."""
    cache = _CheckedCache(cls(len(decoder.layers)), len(decoder.layers))
    if cache.seq_len != 0:
        raise GradingError(f"a new, empty cache should have seq_len 0, got {cache.seq_len}")
    logits, seen = [], 0
    with torch.no_grad():
        for n in schedule:
            logits.append(decoder(ids[:, seen:seen + n], kv_cache=cache).logits)
            seen += n
            if cache.seq_len != seen:
                raise GradingError(f"after feeding {seen} tokens, seq_len is {cache.seq_len}, expected {seen} "
                                   "(seq_len is the number of positions stored: the new token's position)")
    return torch.cat(logits, dim=1)


class _SeqLenHeads(KVCache):
    @property
    def seq_len(self):
        return 0 if self.keys[0] is None else self.keys[0].shape[1]


class _SeqLenBatch(KVCache):
    @property
    def seq_len(self):
        return 0 if self.keys[0] is None else self.keys[0].shape[0]


class _SeqLenCountsEveryLayer(KVCache):
    """A counter bumped by every update call: every layer adds the same tokens again."""

    def __init__(self, num_layers):
        super().__init__(num_layers)
        self.count = 0

    @property
    def seq_len(self):
        return self.count

    def update(self, layer, k, v):
        self.count += k.shape[2]
        return super().update(layer, k, v)


class _Overwrite(KVCache):
    def update(self, layer, k, v):
        self.keys[layer], self.values[layer] = k, v
        return k, v


class _ReturnsNewOnly(KVCache):
    def update(self, layer, k, v):
        super().update(layer, k, v)
        return k, v


class _NewFirst(KVCache):
    def update(self, layer, k, v):
        if self.keys[layer] is not None:
            k, v = torch.cat([k, self.keys[layer]], dim=2), torch.cat([v, self.values[layer]], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class _ConcatHeads(KVCache):
    def update(self, layer, k, v):
        if self.keys[layer] is not None:
            k, v = torch.cat([self.keys[layer], k], dim=1), torch.cat([self.values[layer], v], dim=1)
        self.keys[layer], self.values[layer] = k, v
        return k, v


register(Exercise(
    name="KVCache", lesson=LESSON, reference=KVCache, call=run_cache,
    description="store each layer's keys and values; the decoder then feeds one new token at a time",
    cases=[
        Case("batch 2, a 5-token prompt, then 3 tokens one at a time", _cache_case(2, [5, 1, 1, 1], 141)),
        Case("batch 3, a 4-token prompt, 1 token, then a chunk of 3 tokens at once", _cache_case(3, [4, 1, 3], 142)),
        Case("batch 1, a 1-token prompt, then 4 tokens one at a time", _cache_case(1, [1, 1, 1, 1, 1], 143)),
    ],
    mutants=[
        Mutant("seq_len_counts_heads", _SeqLenHeads,
               "seq_len read the wrong axis: keys are (batch, kv_heads, T, head_dim), so the length is shape[2]"),
        Mutant("seq_len_counts_batch", _SeqLenBatch,
               "seq_len read the batch axis: keys are (batch, kv_heads, T, head_dim), so the length is shape[2]"),
        Mutant("seq_len_counts_every_layer", _SeqLenCountsEveryLayer,
               "seq_len counted the new tokens in every layer's update, so it grows num_layers times too fast - all "
               "layers cache the same positions: read one layer's length, keys[0].shape[2]"),
        Mutant("overwrite", _Overwrite,
               "update replaced the cache with the new keys - append them: torch.cat([old, new], dim=2)"),
        Mutant("returns_new_only", _ReturnsNewOnly,
               "update stored everything but returned only the new keys and values - return the whole cache "
               "(old + new), which is what the new token attends to"),
        Mutant("new_first", _NewFirst,
               "new keys were put before the cached ones - append at the end (torch.cat([old, new], dim=2)); the "
               "causal mask assumes keys in position order"),
        Mutant("concat_heads", _ConcatHeads,
               "concatenated along the heads axis (dim=1) - the sequence axis of (batch, kv_heads, T, head_dim) "
               "is dim=2"),
    ],
))

# ----------------------------------------------------------------------------------------------
# sampling_probs(logits, temperature, top_k, top_p): the distribution sample_next_token draws from


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """Reference: the filtering of vlm_course.decoder.sample_next_token, returned as probabilities (B, V).

    temperature 0 is greedy: all the mass on the argmax. tests/test_grading_l03_l04.py checks that sampling
    from these probabilities is exactly sample_next_token.
    """
    if temperature <= 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth_best = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = sorted_logits.softmax(-1)
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p  # the tokens above already reach top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits.softmax(-1)


def _probs_variant(logits, temperature=1.0, top_k=None, top_p=None, *, crossing=True, after_softmax=False,
                   p_before_t=False, k_strict=False, p_sorted=True):
    if temperature <= 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    raw = logits.float()
    logits = raw if after_softmax else raw / temperature
    if top_k is not None and top_k > 0:
        kth_best = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits <= kth_best if k_strict else logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        basis = (raw.masked_fill(logits == float("-inf"), float("-inf"))) if p_before_t else logits
        if p_sorted:
            sorted_basis, order = torch.sort(basis, descending=True, dim=-1)
        else:
            sorted_basis, order = basis, torch.arange(basis.shape[-1]).expand_as(basis)
        probs = sorted_basis.softmax(-1)
        cumulative = probs.cumsum(-1)
        drop_sorted = (cumulative - probs >= top_p) if crossing else (cumulative > top_p)
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    return probs / temperature if after_softmax else probs


def probs_drop_crossing_token(logits, temperature=1.0, top_k=None, top_p=None):
    return _probs_variant(logits, temperature, top_k, top_p, crossing=False)


def probs_temperature_after_softmax(logits, temperature=1.0, top_k=None, top_p=None):
    return _probs_variant(logits, temperature, top_k, top_p, after_softmax=True)


def probs_top_p_before_temperature(logits, temperature=1.0, top_k=None, top_p=None):
    return _probs_variant(logits, temperature, top_k, top_p, p_before_t=True)


def probs_top_k_strict(logits, temperature=1.0, top_k=None, top_p=None):
    return _probs_variant(logits, temperature, top_k, top_p, k_strict=True)


def probs_top_p_unsorted(logits, temperature=1.0, top_k=None, top_p=None):
    return _probs_variant(logits, temperature, top_k, top_p, p_sorted=False)


def probs_not_renormalised(logits, temperature=1.0, top_k=None, top_p=None):
    """The filter applied to the probabilities of the tempered softmax, without renormalising."""
    if temperature <= 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    full = (logits.float() / temperature).softmax(-1)
    kept = sampling_probs(logits, temperature, top_k, top_p) > 0
    return full * kept


def probs_top_p_before_top_k(logits, temperature=1.0, top_k=None, top_p=None):
    probs = sampling_probs(logits, temperature, None, top_p)
    if temperature <= 0 or top_k is None:
        return probs
    return sampling_probs(probs.log(), 1.0, top_k, None)


def _logits_case(batch, vocab, seed, temperature, top_k=None, top_p=None, scale=2.0):
    return lambda: (randn(batch, vocab, seed=seed, scale=scale), temperature, top_k, top_p)


def _k_then_p_case():
    """At temperature 0.7, tempered probabilities 0.3, 0.2, 0.12, ...: with top_k = 3 the kept three renormalise to
    0.48, 0.32, 0.19, so top_p = 0.4 keeps the best token alone; top-p on the whole distribution would keep two."""
    probs = torch.tensor([0.3, 0.2, 0.12, 0.1, 0.09, 0.08, 0.06, 0.05])
    logits = 0.7 * torch.stack([probs.log(), probs.log().flip(0), probs.log().roll(3)])
    return logits, 0.7, 3, 0.4


def _peaked_case():
    logits = randn(2, 10, seed=157)
    logits[:, 3] += 6.0  # token 3 alone holds more than top_p of the mass
    return logits, 1.0, None, 0.5


register(Exercise(
    name="sampling_probs", lesson=LESSON, reference=sampling_probs,
    description="next-token probabilities after temperature, top-k and top-p (nucleus) filtering",
    cases=[
        Case("temperature 1, no filtering (batch 3, vocabulary 10)", _logits_case(3, 10, 151, 1.0)),
        Case("temperature 0.5 sharpens the distribution", _logits_case(3, 10, 152, 0.5)),
        Case("temperature 0: greedy, all the mass on the best token", _logits_case(2, 8, 153, 0.0)),
        Case("top_k = 3 at temperature 0.8 (batch 4, vocabulary 12)", _logits_case(4, 12, 154, 0.8, top_k=3)),
        Case("top_p = 0.8 at temperature 1 (batch 4, vocabulary 12)", _logits_case(4, 12, 155, 1.0, top_p=0.8)),
        Case("top_p = 0.6 at temperature 2 (the nucleus is taken after the temperature)",
             _logits_case(3, 16, 156, 2.0, top_p=0.6)),
        Case("one token holds more than top_p = 0.5 by itself: it must stay", _peaked_case),
        Case("top_k = 3, then top_p = 0.4 on the three kept tokens renormalised, at temperature 0.7", _k_then_p_case),
    ],
    mutants=[
        Mutant("temperature_after_softmax", probs_temperature_after_softmax,
               "the temperature was applied after the softmax - divide the *logits* by it, then take the softmax"),
        Mutant("top_k_strict", probs_top_k_strict,
               "top-k kept k-1 tokens: mask logits strictly below the k-th best (logits < kth), not <= it"),
        Mutant("drop_crossing_token", probs_drop_crossing_token,
               "top-p dropped the token that crosses the threshold - keep the smallest set whose mass reaches "
               "top_p: drop a token only when the tokens ranked *above* it already reach top_p "
               "(cumulative - own probability >= top_p), so the best token always stays"),
        Mutant("top_p_before_temperature", probs_top_p_before_temperature,
               "the nucleus was computed before the temperature - apply the temperature first, then choose the "
               "tokens whose tempered probabilities reach top_p (as transformers and vlm_course do)"),
        Mutant("top_p_unsorted", probs_top_p_unsorted,
               "the cumulative sum ran over the vocabulary order - sort the probabilities in descending order "
               "first, and map the decision back with scatter"),
        Mutant("not_renormalised", probs_not_renormalised,
               "the filtered tokens were zeroed but the rest not renormalised: rows must sum to 1 - set filtered "
               "logits to -inf, then take the softmax"),
        Mutant("top_p_before_top_k", probs_top_p_before_top_k,
               "top-p was applied before top-k - the order is temperature, then top-k, then top-p on what remains"),
    ],
))
