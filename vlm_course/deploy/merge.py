"""Merge LoRA adapters into the base weights, so the exported model is one plain set of linears.

LoRA trains a low-rank update next to a frozen layer: y = W x + (alpha / r) * B (A x). For deployment we
fold the update into the weight once, W' = W + (alpha / r) * B A, and drop A and B: the runtime then sees
an ordinary linear layer (no extra matmuls, nothing peft-specific to export).

The folding itself is `vlm_course.lora.merge_lora` (one implementation for training and deployment):
a 4-bit (QLoRA) base is dequantised *before* the update is added, so the learnt update is not rounded
away by re-quantising, and 4-bit layers without an adapter become float too. Here we add what an exporter
needs around it: accept a `PeftModel` as well as a model wrapped in place, and check nothing is left.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..lora import has_lora, is_lora_param, merge_lora


def _unwrap_peft_model(model: nn.Module) -> nn.Module:
    """PeftModel(LoraModel(model)) -> model; the LoRA layers inside are then merged in place."""
    try:
        from peft import PeftModel
    except ImportError:
        return model
    return model.get_base_model() if isinstance(model, PeftModel) else model


@torch.no_grad()
def merge_lora_adapters(model: nn.Module) -> nn.Module:
    """Fold every peft LoRA adapter into its base linear and remove the adapters; returns the plain model.

    Works on a model whose linears were wrapped in place (`peft.inject_adapter_in_model`, as the course's
    trainer does), on a `PeftModel` (`get_peft_model`; it is unwrapped) and on a model without LoRA (then
    only 4-bit linears, if any, are dequantised). Modules are replaced in place; use the returned model.
    """
    model = merge_lora(_unwrap_peft_model(model))
    if has_lora(model):
        leftover = [name for name, _ in model.named_parameters() if is_lora_param(name)]
        raise RuntimeError(
            f"LoRA parameters survived the merge: {leftover[:3]} (a peft layer type other than "
            "LoRA on nn.Linear?); merge them with peft's merge_and_unload() before exporting"
        )
    return model
