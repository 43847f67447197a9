"""Recipes: what trains. Freeze, unfreeze, add LoRA or QLoRA per component of the VLM.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..lora import add_lora, has_lora, is_lora_param, is_quantized, quantize_4bit
from .config import COMPONENTS, TrainConfig, autocast_dtype


def apply_recipe(model, cfg: TrainConfig) -> dict[str, int]:
    """Freeze, unfreeze, add LoRA or QLoRA per component; returns trainable parameter counts per component.

    Idempotent, and usable in stages: a model whose decoder already has adapters keeps them (stage 2 of a
    run that first trained only the projector can switch the decoder to lora/qlora on the same model).
    """
    device = next(model.parameters()).device
    model.requires_grad_(False)

    # vision
    if cfg.vision == "lora" and not has_lora(model.vision):
        add_lora(model.vision, cfg.vision_lora_targets, cfg)
    if cfg.vision == "full":
        if has_lora(model.vision):
            raise ValueError("the vision encoder has LoRA adapters: merge_lora(model) before training it fully")
        model.vision.requires_grad_(True)
    elif cfg.vision == "lora":
        _unfreeze_lora(model.vision)

    # projector, and the fusion's new layers (cross-attention blocks; none in a fully autoregressive model): the
    # glue between the two backbones trains with the projector's recipe and learning rate
    model.projector.requires_grad_(cfg.projector == "full")
    if hasattr(model, "fusion"):
        model.fusion.requires_grad_(cfg.projector == "full")

    # decoder
    if cfg.decoder == "qlora" and not is_quantized(model.decoder):
        if has_lora(model.decoder):
            raise ValueError("the decoder already has LoRA on float weights: merge_lora(model) first, then qlora")
        dtype = autocast_dtype(cfg.precision, device) or torch.float32
        # Only the blocks: embeddings and the (tied) lm_head stay in float.
        quantize_4bit(model.decoder.layers, compute_dtype=dtype, double_quant=cfg.double_quant)
        if cfg.frozen_dtype == "compute":
            store_frozen_in(model.decoder, dtype)
    if cfg.decoder in ("lora", "qlora") and not has_lora(model.decoder):
        add_lora(model.decoder, cfg.lora_targets, cfg)
    if cfg.decoder == "full":
        if has_lora(model.decoder) or is_quantized(model.decoder):
            raise ValueError("the decoder has LoRA adapters or 4-bit weights: merge_lora(model) before full training")
        model.decoder.requires_grad_(True)
    elif cfg.decoder in ("lora", "qlora"):
        _unfreeze_lora(model.decoder)
    model.to(device)  # new adapter weights land on the model's device
    return trainable_counts(model)


def store_frozen_in(decoder: nn.Module, dtype: torch.dtype) -> None:
    """The decoder's frozen float weights outside the 4-bit layers -- embeddings (= the tied LM head) and RMSNorm
    scales -- stored in `dtype`. `.to()` keeps each Parameter object, so the LM head stays tied; RoPE's frequency
    table (a buffer of the rotary module) stays fp32."""
    from ..decoder import RMSNorm

    decoder.embed_tokens.to(dtype)
    for module in decoder.modules():
        if isinstance(module, RMSNorm):
            module.to(dtype)


def _unfreeze_lora(module: nn.Module) -> None:
    for name, p in module.named_parameters():
        p.requires_grad_(is_lora_param(name))


def trainable_counts(model) -> dict[str, int]:
    """Trainable parameters per component (shared tensors counted once)."""
    counts = {}
    fusion = getattr(model, "fusion", None)  # counted when it has layers of its own (cross-attention)
    for component in COMPONENTS + (("fusion",) if fusion is not None and list(fusion.parameters()) else ()):
        params = {id(p): p for p in getattr(model, component).parameters() if p.requires_grad}
        counts[component] = sum(p.numel() for p in params.values())
    return counts
