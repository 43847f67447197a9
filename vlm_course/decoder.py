"""The language decoder: a Llama-style transformer, as SmolLM2.

    token ids (B, T) -> embeddings (B, T, D)
      -> L blocks:  x + Attention(RMSNorm(x))   grouped-query, causal, rotary positions, KV cache
                    x + SwiGLU(RMSNorm(x))
      -> RMSNorm -> lm_head (tied to the embeddings in SmolLM2) -> logits (B, T, V)

Positions enter only through RoPE: queries and keys are rotated by an angle proportional to their
position, so q.k depends on the *distance* between two tokens. Generation keeps each layer's keys and
values in a KV cache, so each new token costs one position of work instead of a full re-run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import weight_files
from .config import DecoderConfig
from .registry import register_decoder


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight. No mean subtraction and no bias, unlike LayerNorm."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 even under bf16: a mean of squares loses too much precision in 8 mantissa bits.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings


class RotaryEmbedding(nn.Module):
    """cos and sin tables for RoPE. Frequency i of head_dim d is theta^(-2i/d): fast at i=0, slow at the end."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids.float()[..., None] * self.inv_freq  # (B, T, d/2)
        # The checkpoint's q/k weights are laid out for the "rotate half" pairing: dimension i is paired with
        # i + d/2 (not with i + 1), so the angle table is repeated, not interleaved.
        angles = torch.cat([angles, angles], dim=-1)  # (B, T, d)
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (i, i + d/2) pair of x (B, heads, T, d) by its position's angle."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)  # broadcast over heads
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of every layer for the tokens seen so far: lists of (B, kv_heads, T, head_dim)."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def seq_len(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's k, v to the layer's cache and return all keys and values so far."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def reorder(self, keep: torch.Tensor) -> None:
        """Keep only the batch rows in `keep` (used when finished sequences leave a batch)."""
        self.keys = [k[keep] for k in self.keys]
        self.values = [v[keep] for v in self.values]


# ----------------------------------------------------------------------------------------------
# Attention and MLP


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, kv_heads, T, d) -> (B, kv_heads * n_rep, T, d): query heads 0..n_rep-1 share KV head 0, and so on."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def build_attention_mask(
    attention_mask: torch.Tensor | None, q_len: int, past_len: int, device=None
) -> torch.Tensor | None:
    """Boolean (B, 1, q_len, past_len + q_len) mask, True where a query may attend: causal AND not padding.

    Returns None when SDPA's own `is_causal` (no cache) or no mask at all (one new token) is exact, so it
    can take its fast path.
    """
    kv_len = past_len + q_len
    if attention_mask is None or bool(attention_mask.all()):
        if q_len == 1 or past_len == 0:
            return None
        attention_mask = torch.ones(1, kv_len, dtype=torch.bool, device=device)  # several new tokens on top of a cache
    if attention_mask.shape[-1] != kv_len:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected past + new = {kv_len}")
    q_pos = torch.arange(past_len, kv_len, device=attention_mask.device)[:, None]
    k_pos = torch.arange(kv_len, device=attention_mask.device)[None, :]
    causal = k_pos <= q_pos  # (q_len, kv_len)
    mask = causal[None] & attention_mask[:, None, :].bool()  # (B, q_len, kv_len)
    # A padding query would see no key at all, and softmax over nothing is NaN; let it see itself.
    # Its output is never used (its label is -100 and generation reads only real positions).
    mask |= (k_pos == q_pos)[None]
    return mask[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache: KVCache | None = None, layer_idx: int = 0):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)
        # Grouped-query attention: fewer KV heads than query heads; each KV head serves a group of queries.
        n_rep = self.num_heads // self.num_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        # mask None: plain causal attention when several tokens come in at once (no cache yet); a single new
        # token with a cache may see every cached key, so it needs no mask at all.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=(mask is None and t > 1))
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): a gated MLP; the gate decides, per feature, how much of `up` passes."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, mask, kv_cache=None, layer_idx=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------------------------
# The decoder


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # (B, T, V)
    kv_cache: KVCache | None = None
    hidden_states: torch.Tensor | None = None  # last layer, after the final norm


def last_positions(x: torch.Tensor, n: int) -> torch.Tensor:
    """The hidden states of the last n positions (all of them for n = 0), contiguous, for the LM head.

    Why contiguous: x[:, -1:] is a strided view, and a bf16 matmul on it cannot be folded into one (B, D) x (D, V)
    product; PyTorch then broadcasts the 49152-wide head to every sample and copies it (B x 576 x 49152 values: 2.8 GB
    for a batch of 50, 2.9 s instead of 0.01 s, measured on this course's CPU with bf16 autocast).
    """
    return x[:, -n:].contiguous() if n else x


@register_decoder("llama")  # the kind configs name by default (decoder.kind)
class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(_init_weights)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # one matrix reads tokens in and writes them out

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> DecoderOutput:
        """attention_mask (B, past + T): 1 for real tokens, 0 for padding (left padding for generation).

        logits_to_keep > 0 computes logits only for the last positions (generation needs one; saves a
        (T x V) matmul).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, _ = x.shape
        past_len = kv_cache.seq_len if kv_cache is not None else 0
        if past_len + t > self.cfg.max_position_embeddings:
            raise ValueError(
                f"sequence of {past_len + t} tokens is longer than the decoder's context of "
                f"{self.cfg.max_position_embeddings}: shorten the prompt or lower max_new_tokens"
            )
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, b, t, past_len, x.device)
        cos, sin = self.rotary(position_ids)
        mask = build_attention_mask(attention_mask, t, past_len, x.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, kv_cache, i)
        x = self.norm(x)
        logits = self.lm_head(last_positions(x, logits_to_keep))
        return DecoderOutput(logits=logits, kv_cache=kv_cache, hidden_states=x)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    @classmethod
    def from_llama(cls, path, dtype: torch.dtype = torch.float32) -> "Decoder":
        """Build from a Llama / SmolLM2 checkpoint folder (transformers naming), through our name map."""
        folder = weight_files.resolve(path)
        cfg = decoder_config_from_hf(weight_files.read_config(folder))
        model = cls(cfg)
        tensors = weight_files.read_tensors(folder, llama_name_map(cfg.num_layers), LLAMA_PREFIXES, dtype)
        if not cfg.tie_word_embeddings:
            tensors.update(weight_files.read_tensors(folder, {"lm_head.weight": "lm_head.weight"}, ("",), dtype))
        weight_files.load_mapped(model, tensors)
        return model.to(dtype).eval()

    @torch.no_grad()
    def generate(self, input_ids=None, inputs_embeds=None, attention_mask=None, **kwargs) -> torch.Tensor:
        """Generate new tokens (B, max_new_tokens); see `generate` below for the options."""
        return generate(self, input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        **kwargs)


def default_position_ids(attention_mask, batch: int, q_len: int, past_len: int, device) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded row starts at position 0 like an unpadded one."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + q_len, device=device).expand(batch, q_len)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, -q_len:]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


# ----------------------------------------------------------------------------------------------
# Sampling and generation


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from logits (B, V). temperature 0 means greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth_best = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the best token always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    decoder: Decoder,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Autoregressive generation with left-padded batches. Returns only the new tokens (B, n <= max_new_tokens).

    Rows that produced eos are padded with `pad_token_id` (default: the eos id) until all rows are done.
    Without the cache, every step re-runs the whole sequence: same tokens, quadratic cost (lesson 03).
    """
    if inputs_embeds is None:
        inputs_embeds = decoder.embed_tokens(input_ids)
    b, t, _ = inputs_embeds.shape
    device = inputs_embeds.device
    if attention_mask is None:
        attention_mask = torch.ones(b, t, dtype=torch.long, device=device)
    eos_ids = torch.tensor([] if eos_token_id is None else
                           ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)), device=device)
    pad_id = pad_token_id if pad_token_id is not None else (int(eos_ids[0]) if len(eos_ids) else 0)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}: it is how many tokens to add")
    if t + max_new_tokens > decoder.cfg.max_position_embeddings:
        raise ValueError(
            f"prompt ({t} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of "
            f"{decoder.cfg.max_position_embeddings} tokens: shorten the prompt or lower max_new_tokens"
        )

    kv_cache = KVCache(len(decoder.layers)) if use_cache else None
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    new_tokens = []
    step_embeds = inputs_embeds
    for _ in range(max_new_tokens):
        out = decoder(inputs_embeds=step_embeds, attention_mask=attention_mask, kv_cache=kv_cache, logits_to_keep=1)
        next_token = sample_next_token(out.logits[:, -1], temperature, top_k, top_p, generator)
        next_token = torch.where(finished, torch.full_like(next_token, pad_id), next_token)
        new_tokens.append(next_token)
        finished |= torch.isin(next_token, eos_ids)
        if finished.all():
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        next_embed = decoder.embed_tokens(next_token)[:, None]
        step_embeds = next_embed if use_cache else torch.cat([step_embeds, next_embed], dim=1)
    return torch.stack(new_tokens, dim=1)


# ----------------------------------------------------------------------------------------------
# Weight mapping: transformers LlamaForCausalLM names -> ours.

LLAMA_PREFIXES = ("model.text_model.", "model.", "")  # Idefics3/SmolVLM text model, LlamaForCausalLM, LlamaModel


def llama_name_map(num_layers: int) -> dict[str, str]:
    """Our parameter name -> transformers Llama name (without the containing model's prefix)."""
    names = {"embed_tokens.weight": "embed_tokens.weight", "norm.weight": "norm.weight"}
    per_layer = [
        "input_layernorm.weight", "post_attention_layernorm.weight",
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    ]
    for i in range(num_layers):
        for name in per_layer:
            names[f"layers.{i}.{name}"] = f"layers.{i}.{name}"
    return names


def decoder_config_from_hf(hf: dict) -> DecoderConfig:
    """Our DecoderConfig from a Llama config.json (transformers 4.x `rope_theta` or 5.x `rope_parameters`)."""
    if "text_config" in hf:  # Idefics3 / SmolVLM
        tie = hf.get("tie_word_embeddings", hf["text_config"].get("tie_word_embeddings", False))
        hf = dict(hf["text_config"], tie_word_embeddings=tie)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"unsupported RoPE scaling {rope}: the course decoder implements plain RoPE")
    for key, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, expected) != expected:
            raise ValueError(f"unsupported Llama variant: {key}={hf[key]!r} (the course decoder has {expected!r})")
    eos = hf.get("eos_token_id", 2)
    return DecoderConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_dim=hf.get("head_dim"),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=hf.get("tie_word_embeddings", False), bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
    )
