"""Lesson 07, Jetson deployment: weights_bytes, decoder_parameters, kv_cache_bytes, decode_tokens_per_second.

References are built on vlm_course.deploy.budget (the numbers behind `estimate_memory` and
`decode_roofline`, which tests/test_deploy.py checks against real tensors). Conventions, documented in the
lesson and checked here:

- bytes, not bits or GB; a "GB/s" bandwidth is 10^9 bytes/s (vendors quote decimal units; GiB is 2^30);
- a tied LM head shares the embedding matrix: its parameters and bytes are counted once;
- decode reads every weight matrix once per token, the LM head included, but the input embedding table
  only one row: so an untied table adds no bytes to a decode step, a tied one is read (as the head);
- the KV cache holds K and V (factor 2) for the KV heads, not the query heads (grouped-query attention).
"""

from __future__ import annotations

from ...config import DecoderConfig
from ...deploy import budget
from ..core import Case, Exercise, Mutant
from ..registry import register

LESSON = "07"
EXACT = {"atol": 1e-9, "rtol": 1e-9}


def smollm2() -> DecoderConfig:
    return DecoderConfig()  # SmolLM2-135M: 30 layers, 576 wide, 9 query heads / 3 KV heads, tied head


def small_untied() -> DecoderConfig:
    return DecoderConfig(vocab_size=1000, hidden_size=64, intermediate_size=160, num_layers=3, num_heads=4,
                         num_kv_heads=2, tie_word_embeddings=False)


def wide_heads() -> DecoderConfig:
    """head_dim set explicitly: 4 heads x 40 = 160 != hidden 96, so hidden_size cannot stand in for heads x head_dim
    (and hidden // heads = 24 is not head_dim)."""
    return DecoderConfig(vocab_size=500, hidden_size=96, intermediate_size=256, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=40)


def one_kv_head() -> DecoderConfig:
    return DecoderConfig(vocab_size=300, hidden_size=48, intermediate_size=96, num_layers=5, num_heads=6,
                         num_kv_heads=1, tie_word_embeddings=False)


# ----------------------------------------------------------------------------------------------
# weights_bytes(n_params, bits) -> bytes


def weights_bytes(n_params: int, bits: float) -> float:
    return n_params * bits / 8


def weights_bits_as_bytes(n_params, bits):
    return n_params * bits


def weights_inverted(n_params, bits):
    return n_params * 8 / bits


def weights_in_gb(n_params, bits):
    return n_params * bits / 8 / 1e9


def weights_in_gib(n_params, bits):
    return n_params * bits / 8 / 2**30


def weights_floor_division(n_params, bits):
    return n_params * bits // 8


def weights_rounded_up(n_params, bits):
    return -(-n_params * bits // 8)


register(Exercise(
    name="weights_bytes", lesson=LESSON, reference=weights_bytes, atol=1e-9, rtol=1e-9,
    description="bytes taken by n parameters stored with `bits` bits each",
    cases=[
        Case("SmolLM2-135M (134,515,008 parameters) in fp16", lambda: (134_515_008, 16)),
        Case("nanoVLM-222M in fp32", lambda: (222_000_000, 32)),
        Case("1,000 int8 weights", lambda: (1_000, 8)),
        Case("SmolLM2-135M in NF4 (4.5 bits with its scales)", lambda: (134_515_008, 4.5)),
        Case("7 weights of 4 bits (half bytes are fine)", lambda: (7, 4)),
    ],
    mutants=[
        Mutant("bits_as_bytes", weights_bits_as_bytes, "that is bits, not bytes: divide by 8 (8 bits per byte)"),
        Mutant("inverted", weights_inverted, "bits per weight / 8 is the bytes per weight: n_params * bits / 8"),
        Mutant("gb", weights_in_gb, "return bytes, not GB (divide by 1e9 only when printing)"),
        Mutant("gib", weights_in_gib, "return bytes, not GiB (divide by 2**30 only when printing)"),
        Mutant("floor_division", weights_floor_division,
               "whole-number division dropped half bytes: 7 weights of 4 bits are 3.5 bytes - use / 8, not // 8"),
        Mutant("rounded_up", weights_rounded_up,
               "the bytes were rounded up to a whole number - return the exact n_params * bits / 8 (3.5 for 7 "
               "weights of 4 bits)"),
    ],
))

# ----------------------------------------------------------------------------------------------
# decoder_parameters(cfg) -> int: stored parameters of a Llama/SmolLM2 decoder


def decoder_parameters(cfg: DecoderConfig) -> int:
    return budget.decoder_parameters(cfg)


def _decoder_params(cfg, head: str = "tied", kv_heads=None, per_head: bool = True, norms: bool = True,
                    mlp_matrices: int = 3, final_norm: bool = True, head_dim_from_hidden: bool = False) -> int:
    d, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_heads if head_dim_from_hidden else cfg.head_dim
    kv = cfg.num_kv_heads if kv_heads is None else kv_heads
    if per_head:
        attention = 2 * d * cfg.num_heads * hd + 2 * d * kv * hd
    else:
        attention = 4 * d * d
    per_layer = attention + mlp_matrices * d * cfg.intermediate_size + (2 * d if norms else 0)
    tables = {"tied": 1 if cfg.tie_word_embeddings else 2, "twice": 2, "once": 1}[head]
    return tables * cfg.vocab_size * d + cfg.num_layers * per_layer + (d if norms and final_norm else 0)


def params_tied_counted_twice(cfg):
    return _decoder_params(cfg, head="twice")


def params_untied_head_forgotten(cfg):
    return _decoder_params(cfg, head="once")


def params_kv_as_query_heads(cfg):
    return _decoder_params(cfg, kv_heads=cfg.num_heads)


def params_square_attention(cfg):
    return _decoder_params(cfg, per_head=False)


def params_no_norms(cfg):
    return _decoder_params(cfg, norms=False)


def params_two_mlp_matrices(cfg):
    return _decoder_params(cfg, mlp_matrices=2)


def params_no_final_norm(cfg):
    return _decoder_params(cfg, final_norm=False)


def params_head_dim_from_hidden(cfg):
    return _decoder_params(cfg, head_dim_from_hidden=True)


register(Exercise(
    name="decoder_parameters", lesson=LESSON, reference=decoder_parameters,
    description="parameters a decoder stores: embeddings (+ untied head), attention, SwiGLU MLP, norms",
    cases=[
        Case("head_dim 40 x 4 heads = 160 != hidden 96, 2 KV heads, tied head", lambda: (wide_heads(),)),
        Case("SmolLM2-135M (tied head, 9 query / 3 KV heads)", lambda: (smollm2(),)),
        Case("a small decoder with an untied head", lambda: (small_untied(),)),
        Case("untied head, one KV head for 6 query heads", lambda: (one_kv_head(),)),
    ],
    mutants=[
        Mutant("tied_counted_twice", params_tied_counted_twice,
               "the tied head was counted twice: with tie_word_embeddings the LM head *is* the embedding matrix, "
               "stored once"),
        Mutant("untied_head_forgotten", params_untied_head_forgotten,
               "an untied LM head is a second vocab x hidden matrix: count it when tie_word_embeddings is False"),
        Mutant("kv_as_query_heads", params_kv_as_query_heads,
               "k_proj and v_proj have num_kv_heads * head_dim outputs (grouped-query attention), not num_heads"),
        Mutant("square_attention", params_square_attention,
               "q/k/v/o are not hidden x hidden in general: q and o are hidden x (num_heads * head_dim), k and v "
               "hidden x (num_kv_heads * head_dim)"),
        Mutant("no_norms", params_no_norms,
               "the RMSNorm weights are missing: 2 x hidden per layer, plus hidden for the final norm"),
        Mutant("two_mlp_matrices", params_two_mlp_matrices,
               "SwiGLU has three matrices (gate_proj, up_proj, down_proj), each hidden x intermediate"),
        Mutant("no_final_norm", params_no_final_norm,
               "the final RMSNorm after the last layer is missing: hidden more parameters"),
        Mutant("head_dim_from_hidden", params_head_dim_from_hidden,
               "head_dim is cfg.head_dim, which need not be hidden_size // num_heads (here 40, not 96 // 4 = 24)"),
    ],
))

# ----------------------------------------------------------------------------------------------
# kv_cache_bytes(cfg, context, batch, bytes_per_value) -> bytes


def kv_cache_bytes(cfg: DecoderConfig, context: int, batch: int = 1, bytes_per_value: float = 2) -> float:
    return budget.kv_bytes_per_token(cfg, kv_bits=8 * bytes_per_value) * context * batch


def _kv(cfg, context, batch, bytes_per_value, heads=None, width=None, factor=2):
    width = width if width is not None else (heads if heads is not None else cfg.num_kv_heads) * cfg.head_dim
    return factor * cfg.num_layers * width * context * batch * bytes_per_value


def kv_head_dim_from_hidden(cfg, context, batch=1, bytes_per_value=2):
    return _kv(cfg, context, batch, bytes_per_value, width=cfg.num_kv_heads * (cfg.hidden_size // cfg.num_heads))


def kv_per_token(cfg, context, batch=1, bytes_per_value=2):
    return _kv(cfg, 1, batch, bytes_per_value)


def kv_query_heads(cfg, context, batch=1, bytes_per_value=2):
    return _kv(cfg, context, batch, bytes_per_value, heads=cfg.num_heads)


def kv_no_factor_2(cfg, context, batch=1, bytes_per_value=2):
    return _kv(cfg, context, batch, bytes_per_value, factor=1)


def kv_hidden_size(cfg, context, batch=1, bytes_per_value=2):
    return _kv(cfg, context, batch, bytes_per_value, width=cfg.hidden_size)


def kv_bits(cfg, context, batch=1, bytes_per_value=2):
    return _kv(cfg, context, batch, 8 * bytes_per_value)


def kv_no_batch(cfg, context, batch=1, bytes_per_value=2):
    return _kv(cfg, context, 1, bytes_per_value)


register(Exercise(
    name="kv_cache_bytes", lesson=LESSON, reference=kv_cache_bytes, atol=1e-9, rtol=1e-9,
    description="2 (K and V) x layers x KV heads x head_dim x context x batch x bytes per value",
    cases=[
        Case("head_dim 40, 2 KV heads, 4 query heads, hidden 96; 300 tokens, batch 1, int8",
             lambda: (wide_heads(), 300, 1, 1)),
        Case("SmolLM2-135M, 1,024 tokens, batch 1, fp16", lambda: (smollm2(), 1024, 1, 2)),
        Case("SmolLM2-135M, 8,192 tokens, batch 4, fp32", lambda: (smollm2(), 8192, 4, 4)),
        Case("one KV head for 6 query heads, 77 tokens, batch 3, fp16", lambda: (one_kv_head(), 77, 3, 2)),
    ],
    mutants=[
        Mutant("query_heads", kv_query_heads,
               "the cache was sized with the query heads: only the num_kv_heads K/V heads are cached (that is the "
               "point of grouped-query attention: SmolLM2 caches 3 heads, not 9)"),
        Mutant("no_factor_2", kv_no_factor_2, "only one of K and V was counted: the cache holds both (factor 2)"),
        Mutant("hidden_size", kv_hidden_size,
               "hidden_size was used as the cached width: each layer caches num_kv_heads * head_dim values for K "
               "and as many for V"),
        Mutant("bits", kv_bits, "bytes_per_value is already in bytes: do not multiply by 8"),
        Mutant("no_batch", kv_no_batch, "each sequence of the batch has its own cache: multiply by batch"),
        Mutant("head_dim_from_hidden", kv_head_dim_from_hidden,
               "head_dim is cfg.head_dim, which need not be hidden_size // num_heads (here 40, not 96 // 4 = 24)"),
        Mutant("per_token", kv_per_token, "that is the cache for one token: multiply by the context length"),
    ],
))

# ----------------------------------------------------------------------------------------------
# decode_tokens_per_second(bandwidth_gb_s, cfg, weight_bits, context, kv_bytes_per_value) -> tokens/s


def decode_tokens_per_second(bandwidth_gb_s: float, cfg: DecoderConfig, weight_bits: float, context: int,
                             kv_bytes_per_value: float = 2) -> float:
    return budget.decode_roofline(cfg, bandwidth_gb_s * 1e9, weights=weight_bits, kv_bits=8 * kv_bytes_per_value,
                                  context_length=context).tokens_per_s


def _roofline(bandwidth_gb_s, cfg, weight_bits, context, kv_bytes_per_value, unit=1e9, kv=True,
              read_input_table=False, weight_bits_as_bytes=False):
    params = budget.decoder_parameters(cfg)
    if not cfg.tie_word_embeddings and not read_input_table:
        params -= cfg.vocab_size * cfg.hidden_size
    weight = params * (weight_bits if weight_bits_as_bytes else weight_bits / 8)
    cache = kv_cache_bytes(cfg, context, 1, kv_bytes_per_value) if kv else 0
    return bandwidth_gb_s * unit / (weight + cache)


def roofline_seconds_per_token(bandwidth_gb_s, cfg, weight_bits, context, kv_bytes_per_value=2):
    return 1 / _roofline(bandwidth_gb_s, cfg, weight_bits, context, kv_bytes_per_value)


def roofline_kv_bytes_as_bits(bandwidth_gb_s, cfg, weight_bits, context, kv_bytes_per_value=2):
    return _roofline(bandwidth_gb_s, cfg, weight_bits, context, 8 * kv_bytes_per_value)


def roofline_gib(bandwidth_gb_s, cfg, weight_bits, context, kv_bytes_per_value=2):
    return _roofline(bandwidth_gb_s, cfg, weight_bits, context, kv_bytes_per_value, unit=2**30)


def roofline_no_kv(bandwidth_gb_s, cfg, weight_bits, context, kv_bytes_per_value=2):
    return _roofline(bandwidth_gb_s, cfg, weight_bits, context, kv_bytes_per_value, kv=False)


def roofline_reads_input_table(bandwidth_gb_s, cfg, weight_bits, context, kv_bytes_per_value=2):
    return _roofline(bandwidth_gb_s, cfg, weight_bits, context, kv_bytes_per_value, read_input_table=True)


def roofline_bits_as_bytes(bandwidth_gb_s, cfg, weight_bits, context, kv_bytes_per_value=2):
    return _roofline(bandwidth_gb_s, cfg, weight_bits, context, kv_bytes_per_value, weight_bits_as_bytes=True)


register(Exercise(
    name="decode_tokens_per_second", lesson=LESSON, reference=decode_tokens_per_second, atol=1e-9, rtol=1e-9,
    description="the decode roofline: bandwidth / (weight bytes read + KV-cache bytes read) per token",
    cases=[
        Case("SmolLM2-135M fp16 on an Orin Nano (68 GB/s), 1,024 tokens of fp16 cache",
             lambda: (68, smollm2(), 16, 1024, 2)),
        Case("SmolLM2-135M 4.5-bit on an Orin Nano Super (102 GB/s), 8,192 tokens of fp16 cache",
             lambda: (102, smollm2(), 4.5, 8192, 2)),
        Case("an untied decoder in fp32 at 10 GB/s, 512 tokens of fp32 cache", lambda: (10, small_untied(), 32, 512, 4)),
        Case("one KV head, untied, int8 at 25.6 GB/s, 1,000 tokens of int8 cache",
             lambda: (25.6, one_kv_head(), 8, 1000, 1)),
    ],
    mutants=[
        Mutant("gib", roofline_gib,
               "a GB/s figure is 10^9 bytes/s (memory vendors use decimal units): multiply by 1e9, not 2**30"),
        Mutant("no_kv", roofline_no_kv,
               "the KV cache was not counted: each new token's attention reads the keys and values of the whole "
               "context (kv_cache_bytes(cfg, context, 1, kv_bytes_per_value))"),
        Mutant("reads_input_table", roofline_reads_input_table,
               "an untied input embedding table is not read per token (the lookup reads one row); only the LM head "
               "is: count vocab x hidden once, tied or not"),
        Mutant("bits_as_bytes", roofline_bits_as_bytes, "weight_bits are bits: the weights read are params * bits / 8 bytes"),
        Mutant("seconds_per_token", roofline_seconds_per_token,
               "that is seconds per token (bytes / bandwidth) - tokens per second is bandwidth / bytes read per token"),
        Mutant("kv_bytes_as_bits", roofline_kv_bytes_as_bits,
               "kv_bytes_per_value is already in bytes: the cache read is kv_cache_bytes(cfg, context, 1, "
               "kv_bytes_per_value), without a factor 8"),
    ],
))
