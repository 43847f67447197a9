"""The optimiser and its schedule: AdamW with one learning rate per component, linear warmup then cosine.
"""

from __future__ import annotations

import math

import torch

from ..lora import is_lora_param
from .config import TrainConfig


def component_of(name: str) -> str:
    return name.split(".", 1)[0]


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: one per (component, LoRA or full, decay or not), each with its lr.

    No weight decay on 1-D parameters (norm scales, biases, DoRA magnitudes): decaying them toward zero
    fights the normalisation they implement.
    """
    # the fusion's new layers (cross-attention blocks) learn at the projector's rate unless given their own: both
    # are new glue
    fusion = cfg.lr_projector if cfg.lr_fusion is None else cfg.lr_fusion
    lrs = {"vision": cfg.lr_vision, "projector": cfg.lr_projector, "decoder": cfg.lr_decoder, "fusion": fusion}
    groups: dict[str, dict] = {}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        component, lora = component_of(name), is_lora_param(name)
        decay = p.ndim >= 2 and "norm" not in name
        key = f"{component}{'_lora' if lora else ''}{'' if decay else '_no_decay'}"
        if key not in groups:
            groups[key] = {"name": key, "params": [], "lr": cfg.lr_lora if lora else lrs[component],
                           "weight_decay": cfg.weight_decay if decay else 0.0}
        groups[key]["params"].append(p)
    if not groups:
        raise ValueError("nothing to train: every component is frozen (set projector='full' or a decoder recipe)")
    return list(groups.values())


def build_optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg)
    try:  # the fused kernel is ~10x faster than the per-tensor loop on a CPU (torch >= 2.4); same maths
        return torch.optim.AdamW(groups, betas=cfg.adam_betas, eps=1e-8, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, betas=cfg.adam_betas, eps=1e-8)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of every group's lr at optimiser step `step` (0-based): linear warmup, then cosine."""
    warmup = math.ceil(cfg.warmup_fraction * cfg.max_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
