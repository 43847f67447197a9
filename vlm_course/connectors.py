"""Connectors: the three ways the course turns vision patches into decoder tokens, registered by kind.

    kind        what                                                          tokens per image      used by
    linear      pixel shuffle by r, one linear layer (`ModalityProjector`)    patches / r^2         nanoVLM, Idefics3
    mlp         pixel shuffle by r, linear - GELU - linear                    patches / r^2         LLaVA-1.5, TinyLLaVA
    perceiver   (pixel shuffle by r), then a perceiver resampler: a fixed     num_queries (64)      Idefics2, Flamingo
                set of learned queries cross-attending to all the patches

r = 1 is "no pixel shuffle": every patch becomes one token. The linear kind keeps the demo's extras (several
tokens per block, count tokens: `vlm_course.counting`); the others refuse them with a clear error.

`connector_cost(config)` works out what a connector costs per image: the tokens it hands the decoder and the
FLOPs of its own matrix multiplications (2 per multiply-add; norms, softmax and activations are left out, they are
a few percent). Each kind's class has a `flops(cfg, num_patches, vision_hidden_size, decoder_hidden_size)`
static method; a kind without one has an unknown cost (None).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DecoderConfig, ProjectorConfig, VLMConfig
from .decoder import RMSNorm, SwiGLU
from .projector import ModalityProjector, pixel_shuffle
from .registry import part_class, register_connector


def _init_linear_layers(module: nn.Module) -> None:
    # nanoVLM's projector initialisation: a small normal, so the first image tokens sit near the scale of text.
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _refuse_demo_extras(cfg: ProjectorConfig, kind: str) -> None:
    if cfg.count_labels or cfg.tokens_per_block != 1:
        raise ValueError(f"the {kind!r} connector writes one token per block (or per query) and no count tokens: "
                         "tokens_per_block > 1 and count_labels are the demo's extras of kind='linear' "
                         f"(got tokens_per_block={cfg.tokens_per_block}, count_labels={cfg.count_labels!r})")


# ----------------------------------------------------------------------------------------------
# linear: today's ModalityProjector (projector.py), registered under its kind


class LinearConnector(ModalityProjector):
    """Pixel shuffle, then one linear layer: `ModalityProjector`, under the connector registry's name "linear"."""

    def __init__(self, cfg: ProjectorConfig, vision_hidden_size: int, decoder_hidden_size: int):
        if cfg.num_queries is not None:
            raise ValueError("kind='linear' writes one token per pixel-shuffled block: set num_queries=None "
                             "(a fixed number of tokens is kind='perceiver')")
        super().__init__(cfg, vision_hidden_size, decoder_hidden_size)

    @staticmethod
    def flops(cfg: ProjectorConfig, num_patches: int, vision_hidden_size: int, decoder_hidden_size: int) -> int:
        blocks = num_patches // cfg.shuffle_factor**2
        return 2 * blocks * vision_hidden_size * cfg.shuffle_factor**2 * decoder_hidden_size * cfg.tokens_per_block


register_connector("linear")(LinearConnector)


# ----------------------------------------------------------------------------------------------
# mlp: LLaVA-1.5's two-layer projector (TinyLLaVA Factory's "mlp2x_gelu"), after a pixel shuffle


@register_connector("mlp")
class MLPConnector(nn.Module):
    """Pixel shuffle by r, then Linear(Dv r^2 -> H) - GELU - Linear(H -> D), H = mlp_hidden_size or D.

    The parameter names (proj.0, proj.2) are ModalityProjector's kind="mlp" ones, so a model saved with that
    projector loads into this connector unchanged."""

    def __init__(self, cfg: ProjectorConfig, vision_hidden_size: int, decoder_hidden_size: int):
        super().__init__()
        _refuse_demo_extras(cfg, "mlp")
        if cfg.num_queries is not None:
            raise ValueError("kind='mlp' writes one token per pixel-shuffled block: set num_queries=None")
        self.cfg = cfg
        hidden = cfg.mlp_hidden_size or decoder_hidden_size
        self.proj = nn.Sequential(
            nn.Linear(vision_hidden_size * cfg.shuffle_factor**2, hidden, bias=True),
            nn.GELU(),
            nn.Linear(hidden, decoder_hidden_size, bias=True),
        )
        _init_linear_layers(self)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_shuffle(patches, self.cfg.shuffle_factor))

    @staticmethod
    def flops(cfg: ProjectorConfig, num_patches: int, vision_hidden_size: int, decoder_hidden_size: int) -> int:
        blocks = num_patches // cfg.shuffle_factor**2
        hidden = cfg.mlp_hidden_size or decoder_hidden_size
        return 2 * blocks * (vision_hidden_size * cfg.shuffle_factor**2 * hidden + hidden * decoder_hidden_size)


# ----------------------------------------------------------------------------------------------
# perceiver: Idefics2's resampler (arXiv 2405.02246 section 2.2; transformers' Idefics2PerceiverResampler)


class ResamplerAttention(nn.Module):
    """The queries (latents) attend to [patches; latents]: keys and values come from both, as in Flamingo's and
    Idefics2's resampler; only the latents ask, so the output has as many tokens as there are latents."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"the resampler's width {width} is not divisible by resampler_heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, q_len, width = latents.shape
        both = torch.cat([context, latents], dim=1)  # (B, patches + latents, width)

        def heads(x):  # (B, T, width) -> (B, heads, T, head_dim)
            return x.view(b, x.shape[1], self.num_heads, width // self.num_heads).transpose(1, 2)

        # no mask: every latent sees every patch and every latent
        out = F.scaled_dot_product_attention(heads(self.q_proj(latents)), heads(self.k_proj(both)), heads(self.v_proj(both)))
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, width))


class ResamplerLayer(nn.Module):
    """One perceiver layer (Idefics2PerceiverLayer's names): attention of the normed latents to the normed patches
    and latents, then a SwiGLU feed-forward layer 4x wide, each with a residual."""

    def __init__(self, width: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.input_latents_norm = RMSNorm(width, eps)
        self.input_context_norm = RMSNorm(width, eps)
        self.self_attn = ResamplerAttention(width, num_heads)
        self.post_attention_layernorm = RMSNorm(width, eps)
        self.mlp = SwiGLU(DecoderConfig(hidden_size=width, intermediate_size=4 * width, num_heads=1, num_kv_heads=1))

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        latents = latents + self.self_attn(self.input_latents_norm(latents), self.input_context_norm(context))
        return latents + self.mlp(self.post_attention_layernorm(latents))


@register_connector("perceiver")
class PerceiverResampler(nn.Module):
    """Patches (B, P, Dv) -> (B, num_queries, D): pixel shuffle by r (r = 1: all patches, as Idefics2), a linear
    layer to the decoder width D, then `resampler_layers` perceiver layers in which `num_queries` learned latents
    cross-attend to the patches, and a final RMSNorm. 729 patches -> 64 tokens in Idefics2.

    The resampler's names and maths are transformers' Idefics2PerceiverResampler's (tests/test_connectors.py checks
    it against it); Idefics2 maps the patches to D with a SwiGLU MLP where the course uses one linear layer."""

    def __init__(self, cfg: ProjectorConfig, vision_hidden_size: int, decoder_hidden_size: int, eps: float = 1e-6):
        super().__init__()
        _refuse_demo_extras(cfg, "perceiver")
        if cfg.num_queries is None:
            raise ValueError("kind='perceiver' needs num_queries, the number of learned queries = tokens per image "
                             "(Idefics2: 64)")
        self.cfg = cfg
        self.input_proj = nn.Linear(vision_hidden_size * cfg.shuffle_factor**2, decoder_hidden_size, bias=False)
        self.latents = nn.Parameter(torch.empty(cfg.num_queries, decoder_hidden_size))
        self.layers = nn.ModuleList(ResamplerLayer(decoder_hidden_size, cfg.resampler_heads, eps)
                                    for _ in range(cfg.resampler_layers))
        self.norm = RMSNorm(decoder_hidden_size, eps)
        _init_linear_layers(self)
        nn.init.normal_(self.latents, std=0.02)  # distinct latents: equal ones would all read the same thing

    def resample(self, context: torch.Tensor) -> torch.Tensor:
        """(B, P', D) context in the decoder width -> (B, num_queries, D)."""
        latents = self.latents.to(context.dtype).expand(context.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, context)
        return self.norm(latents)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.resample(self.input_proj(pixel_shuffle(patches, self.cfg.shuffle_factor)))

    @staticmethod
    def flops(cfg: ProjectorConfig, num_patches: int, vision_hidden_size: int, decoder_hidden_size: int) -> int:
        return perceiver_flops(num_patches // cfg.shuffle_factor**2, cfg.num_queries, decoder_hidden_size,
                               cfg.resampler_layers, vision_hidden_size * cfg.shuffle_factor**2)


def perceiver_flops(num_context: int, num_queries: int, width: int, num_layers: int, context_width: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of a perceiver resampler on one image.

    num_context tokens of context_width are projected to `width` once; then each layer projects queries (Q x width)
    and keys/values over the patches and queries (P + Q tokens), scores each query against P + Q keys and sums as
    many values, projects out, and runs a 4x SwiGLU feed-forward layer on the Q queries only. The patches are read once
    per layer, but nothing grows with P x P: that is why a resampler is cheap on many patches."""
    kv_len = num_context + num_queries
    per_layer = (2 * num_queries * width * width  # q_proj
                 + 2 * 2 * kv_len * width * width  # k_proj, v_proj
                 + 2 * 2 * num_queries * kv_len * width  # scores and the weighted sum of values
                 + 2 * num_queries * width * width  # o_proj
                 + 3 * 2 * num_queries * width * 4 * width)  # SwiGLU feed-forward: gate, up (width -> 4 width), down
    return 2 * num_context * context_width * width + num_layers * per_layer


def connector_cost(config: VLMConfig) -> dict:
    """What the connector of `config` costs per image: {"kind", "tokens", "flops", "parameters"}.

    tokens: what it hands the decoder (`VLMConfig.connector_tokens_per_image`); flops: its own matmuls, or None
    for a kind whose class has no `flops` method; parameters: counted on a meta-device build (no memory)."""
    cfg = config.projector
    cls = part_class("connector", cfg.kind)
    flops = getattr(cls, "flops", None)
    with torch.device("meta"):
        module = cls(cfg, config.vision.hidden_size, config.decoder.hidden_size)
    return {
        "kind": cfg.kind,
        "tokens": config.connector_tokens_per_image,
        "flops": None if flops is None else flops(cfg, config.vision.num_patches, config.vision.hidden_size,
                                                  config.decoder.hidden_size),
        "parameters": sum(p.numel() for p in module.parameters()),
    }


def format_flops(flops: float | None) -> str:
    """1.2e9 -> '1.20 GFLOP'; None -> 'unknown'."""
    if flops is None:
        return "unknown"
    if flops == 0:
        return "0 FLOP"
    units = ["", "k", "M", "G", "T"]
    power = min(len(units) - 1, int(math.log10(abs(flops)) // 3))
    return f"{flops / 1000**power:.2f} {units[power]}FLOP"
