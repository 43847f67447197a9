"""Fusion: how the image's tokens reach the decoder. Two designs, registered by kind (config `fusion.kind`).

    autoregressive   (nanoVLM, Idefics2/3, SmolVLM) the image tokens are written into the decoder's input, in place
                     of the <image> placeholders: the decoder reads them as it reads words. No new parameters.

    cross_attention  (Flamingo, arXiv 2204.14198) the text keeps one <image> marker per image; new blocks inserted
                     between the decoder's layers let each text token attend to the tokens of the image before it:

                         x = x + tanh(a) * CrossAttention(RMSNorm(x), image tokens)
                         x = x + tanh(b) * FeedForward(RMSNorm(x))          a = b = 0 at the start

                     tanh(0) = 0, so at initialisation every block adds exactly zero: the model *is* the pretrained
                     language model, token for token, and the image has no effect. Training opens the gates.

A fusion's `prepare(model, input_ids, pixel_values)` returns the decoder's input embeddings and the decoder to run
them through (called as `Decoder` is, so the training loss, `VisionLanguageModel.forward` and generation with a KV
cache work for either design). `fusion_cost(config, text_tokens)` works out what each design costs.

Idefics2 (arXiv 2405.02246, section 3) compared the two on the same backbones and found the fully autoregressive one
better once the backbones are trained (with LoRA); lesson 08 measures the comparison at the course's scale.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DecoderConfig, FusionConfig, VLMConfig
from .decoder import (
    DecoderOutput,
    KVCache,
    RMSNorm,
    build_attention_mask,
    default_position_ids,
    last_positions,
)
from .registry import register_fusion


def splice_image_features(
    token_embeds: torch.Tensor, input_ids: torch.Tensor, image_features: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """Write image features (N, P, D), in order, over the positions where input_ids == image_token_id."""
    is_image = input_ids == image_token_id
    num_slots, num_features = int(is_image.sum()), image_features.shape[0] * image_features.shape[1]
    if num_slots != num_features:
        raise ValueError(
            f"the text has {num_slots} image tokens but the {image_features.shape[0]} images give {num_features} "
            f"features ({image_features.shape[1]} each): every image needs exactly one block of image tokens "
            "(build inputs with the processor)"
        )
    # masked_scatter fills the True positions in row-major order: sample 0's images first, then sample 1's.
    features = image_features.reshape(-1, image_features.shape[-1]).to(token_embeds.dtype)
    return token_embeds.masked_scatter(is_image.unsqueeze(-1), features)


def _no_images(pixel_values) -> bool:
    return pixel_values is None or pixel_values.shape[0] == 0


# ----------------------------------------------------------------------------------------------
# Fully autoregressive: the image tokens in the decoder's input


@register_fusion("autoregressive")
class AutoregressiveFusion(nn.Module):
    """Image tokens spliced into the token embeddings; the decoder runs unchanged. No parameters."""

    def __init__(self, cfg: FusionConfig, decoder_cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg

    def prepare(self, model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None):
        token_embeds = model.token_embeddings(input_ids)
        is_image = input_ids == model.image_token_id
        if _no_images(pixel_values):
            if is_image.any():
                raise ValueError(f"the text has {int(is_image.sum())} image tokens but no images were given")
            return token_embeds, model.decoder
        features = model.encode_images(pixel_values)
        return splice_image_features(token_embeds, input_ids, features, model.image_token_id), model.decoder


# ----------------------------------------------------------------------------------------------
# Cross-attention: Flamingo's gated blocks between the decoder's layers


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's GATED XATTN-DENSE block: text (B, T, D) attends to image tokens (B, K, D), through tanh gates
    that start at 0 (so the block starts as the identity)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: int = 4, eps: float = 1e-5):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"the decoder width {width} is not divisible by its {num_heads} heads")
        self.num_heads = num_heads
        self.text_norm = RMSNorm(width, eps)
        self.image_norm = RMSNorm(width, eps)
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp_norm = RMSNorm(width, eps)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width, bias=False), nn.GELU(),
                                 nn.Linear(mlp_ratio * width, width, bias=False))
        self.mlp_gate = nn.Parameter(torch.zeros(1))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)

    def cross_attention(self, x: torch.Tensor, images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, D) queries; images (B, K, D) keys and values; mask (B, 1, T, K), True where a query may look."""
        b, t, width = x.shape
        head_dim = width // self.num_heads
        q = self.q_proj(x).view(b, t, self.num_heads, head_dim).transpose(1, 2)
        kv = self.image_norm(images)
        k = self.k_proj(kv).view(b, -1, self.num_heads, head_dim).transpose(1, 2)
        v = self.v_proj(kv).view(b, -1, self.num_heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, width))

    def forward(self, x: torch.Tensor, images: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                has_image: torch.Tensor | None = None) -> torch.Tensor:
        """images None: no image in the batch, only the gated feed-forward runs. has_image (B, T): which positions
        have an image before them (the others get no cross-attention, as in Flamingo)."""
        if images is not None:
            attended = self.cross_attention(self.text_norm(x), images, mask)
            if has_image is not None:
                attended = attended * has_image.unsqueeze(-1).to(attended.dtype)
            x = x + self.attn_gate.tanh().to(x.dtype) * attended
        return x + self.mlp_gate.tanh().to(x.dtype) * self.mlp(self.mlp_norm(x))


class ImageContext:
    """One batch's images, laid out for cross-attention: each row's images side by side, and for each text position
    which of its row's images it reads (the last one at or before it; -1 before the first)."""

    def __init__(self, is_marker: torch.Tensor, image_tokens: torch.Tensor | None):
        batch, _ = is_marker.shape
        count = is_marker.long().cumsum(1)  # markers at or before each position
        self.slot = count - 1  # (B, T): which of its row's images a position reads; -1: none yet
        self.tokens = None
        if image_tokens is None:
            return
        n, per_image, width = image_tokens.shape
        rows, cols = is_marker.nonzero(as_tuple=True)  # row-major: sample 0's images first, as the processor orders
        if len(rows) != n:
            raise ValueError(f"the text has {len(rows)} image markers but {n} images were given: every image needs "
                             "one <image> marker (build inputs with the processor)")
        slots = max(1, int(count[:, -1].max()))
        laid_out = image_tokens.new_zeros(batch, slots, per_image, width)
        laid_out[rows, self.slot[rows, cols]] = image_tokens
        self.tokens = laid_out.reshape(batch, slots * per_image, width)
        self.key_slot = torch.arange(slots, device=is_marker.device).repeat_interleave(per_image)  # (K,)

    def for_positions(self, past: int, length: int):
        """(slot (B, t), mask (B, 1, t, K) or None, has_image (B, t)) for `length` positions after `past` ones.
        Positions past the prompt (generated tokens) read the row's last image."""
        slot = self.slot[:, past:past + length]
        if slot.shape[1] < length:  # generation: every new token reads the last image of its row
            slot = torch.cat([slot, self.slot[:, -1:].expand(-1, length - slot.shape[1])], dim=1)
        has_image = slot >= 0
        if self.tokens is None:
            return slot, None, has_image
        mask = slot.unsqueeze(-1) == self.key_slot  # (B, t, K)
        mask = mask | ~has_image.unsqueeze(-1)  # nothing to see: attend anywhere (its output is zeroed), not NaN
        return slot, mask.unsqueeze(1), has_image


class CrossAttentionDecoder:
    """The decoder with the fusion's gated blocks before some of its layers, bound to one batch's images.

    Called as `Decoder` is (inputs_embeds, attention_mask, kv_cache, logits_to_keep), and exposes what
    `decoder.generate` reads (embed_tokens, layers, cfg, lm_head), so generation with a KV cache runs unchanged:
    the image tokens are keys and values of the blocks, computed afresh each step (they are few)."""

    def __init__(self, decoder, fusion: "GatedCrossAttentionFusion", context: ImageContext):
        self.decoder, self.fusion, self.context = decoder, fusion, context
        self.cfg, self.embed_tokens, self.layers, self.lm_head = decoder.cfg, decoder.embed_tokens, decoder.layers, decoder.lm_head

    def __call__(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                 kv_cache: KVCache | None = None, logits_to_keep: int = 0) -> DecoderOutput:
        # Decoder.forward's steps, with a gated block before the layers the fusion chose.
        decoder = self.decoder
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = decoder.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, _ = x.shape
        past = kv_cache.seq_len if kv_cache is not None else 0
        if past + t > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {past + t} tokens is longer than the decoder's context of "
                             f"{self.cfg.max_position_embeddings}: shorten the prompt or lower max_new_tokens")
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, b, t, past, x.device)
        cos, sin = decoder.rotary(position_ids)
        mask = build_attention_mask(attention_mask, t, past, x.device)
        _, image_mask, has_image = self.context.for_positions(past, t)
        images = self.context.tokens
        for i, layer in enumerate(decoder.layers):
            block = self.fusion.block_before(i)
            if block is not None:
                x = block(x, None if images is None else images.to(x.dtype), image_mask, has_image)
            x = layer(x, cos, sin, mask, kv_cache, i)
        x = decoder.norm(x)
        logits = decoder.lm_head(last_positions(x, logits_to_keep))
        return DecoderOutput(logits=logits, kv_cache=kv_cache, hidden_states=x)


@register_fusion("cross_attention")
class GatedCrossAttentionFusion(nn.Module):
    """Flamingo's fusion: a gated cross-attention block before decoder layers every-1, 2*every-1, ... (as
    open_flamingo places them), and a learned embedding for the one <image> marker each image leaves in the text."""

    def __init__(self, cfg: FusionConfig, decoder_cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        every = cfg.cross_attention_every
        self.positions = [i for i in range(decoder_cfg.num_layers) if (i + 1) % every == 0]
        if not self.positions:
            raise ValueError(f"cross_attention_every={every} is more than the decoder's {decoder_cfg.num_layers} layers: "
                             "no block would be inserted")
        self.blocks = nn.ModuleDict({
            str(i): GatedCrossAttentionBlock(decoder_cfg.hidden_size, decoder_cfg.num_heads, cfg.mlp_ratio,
                                             decoder_cfg.rms_norm_eps) for i in self.positions})
        # Flamingo learns the embedding of its <image> tag; zeros at first (a token that carries nothing).
        self.image_marker = nn.Parameter(torch.zeros(decoder_cfg.hidden_size))

    def block_before(self, layer: int) -> GatedCrossAttentionBlock | None:
        return self.blocks[str(layer)] if layer in self.positions else None

    def prepare(self, model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None):
        token_embeds = model.token_embeddings(input_ids)
        is_marker = input_ids == model.image_token_id
        embeds = torch.where(is_marker.unsqueeze(-1), self.image_marker.to(token_embeds.dtype), token_embeds)
        if _no_images(pixel_values) and is_marker.any():
            raise ValueError(f"the text has {int(is_marker.sum())} image markers but no images were given")
        images = None if _no_images(pixel_values) else model.encode_images(pixel_values)
        return embeds, CrossAttentionDecoder(model.decoder, self, ImageContext(is_marker, images))


# ----------------------------------------------------------------------------------------------
# What each design costs


def decoder_flops_per_token(cfg: DecoderConfig) -> int:
    """Matmul FLOPs one token costs in the decoder's layers (2 per multiply-add; without the LM head, and without
    the attention scores, which grow with the context: a few percent at these lengths)."""
    d, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    attention = d * cfg.num_heads * cfg.head_dim * 2 + d * kv * 2  # q, o; k, v
    mlp = 3 * d * cfg.intermediate_size
    return 2 * cfg.num_layers * (attention + mlp)


def fusion_cost(config: VLMConfig, text_tokens: int = 32) -> dict:
    """What one image costs the decoder under `config`'s fusion, for a text of `text_tokens` tokens:
    {"kind", "decoder_tokens" (image tokens in its input), "flops" (matmul FLOPs the image adds)}.

    autoregressive: every image token runs through every decoder layer. cross_attention: one marker token through
    the layers, plus the blocks: each projects the image tokens to keys and values once and each text token
    queries them, and runs its gated feed-forward on every text token."""
    image_tokens = config.connector_tokens_per_image  # what the cross-attention blocks read
    if config.fusion.kind == "autoregressive":
        in_text = config.image_tokens_per_image
        return {"kind": "autoregressive", "decoder_tokens": in_text,
                "flops": in_text * decoder_flops_per_token(config.decoder)}
    if config.fusion.kind != "cross_attention":  # a kind the course does not know the cost of
        return {"kind": config.fusion.kind, "decoder_tokens": config.image_tokens_per_image, "flops": None}
    d, ratio = config.decoder.hidden_size, config.fusion.mlp_ratio
    blocks = len([i for i in range(config.decoder.num_layers) if (i + 1) % config.fusion.cross_attention_every == 0])
    per_block = (2 * 2 * image_tokens * d * d  # keys and values of the image tokens
                 + text_tokens * (2 * 2 * d * d + 2 * 2 * image_tokens * d  # q, o; scores and weighted values
                                  + 2 * 2 * d * ratio * d))  # gated feed-forward
    return {"kind": config.fusion.kind, "decoder_tokens": 1,
            "flops": decoder_flops_per_token(config.decoder) + blocks * per_block}
