"""LoRA adapters, and the 4-bit NF4 base that QLoRA puts under them; merging both back into plain layers.

QLoRA (Dettmers et al. 2023): the frozen weights are stored as 4-bit NF4 (bitsandbytes Linear4bit, dequantised
on the fly for each matmul), and small LoRA matrices A (r x in) and B (out x r) are trained on top in full
precision: y = W_nf4 x + (alpha / r) * B A x. Memory for the base drops ~4x; gradients flow through the
dequantised base into the adapters only.

These functions work on any nn.Module: training applies them per component (training/recipes.py), the
distributed code asks whether a model is 4-bit, and deployment merges the adapters before export.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def is_lora_param(name: str) -> bool:
    return "lora_" in name  # lora_A, lora_B, lora_magnitude_vector (DoRA)


def has_lora(module: nn.Module) -> bool:
    return any(is_lora_param(n) for n, _ in module.named_parameters())


def is_quantized(module: nn.Module) -> bool:
    import bitsandbytes as bnb

    return any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules())


def quantize_4bit(module: nn.Module, compute_dtype: torch.dtype = torch.float32, double_quant: bool = True) -> int:
    """Replace every nn.Linear inside `module` by a bitsandbytes NF4 Linear4bit; returns how many.

    NF4 stores each weight as a 4-bit index into 16 levels placed at quantiles of a normal distribution (weights
    are roughly normal), with one absmax scale per block of 64 weights; double quantisation stores those
    scales in 8 bits too. The layer dequantises to `compute_dtype` for each matmul.
    """
    import bitsandbytes as bnb

    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:  # exactly nn.Linear: not LoRA wrappers, not already 4-bit
                continue
            quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=compute_dtype, compress_statistics=double_quant,
                                          quant_type="nf4", device="meta")
            quantized.weight = bnb.nn.Params4bit(child.weight.data.float().contiguous(), requires_grad=False,
                                                 compress_statistics=double_quant, quant_type="nf4")
            if child.bias is not None:
                quantized.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            # In eval mode on an AVX512-bf16 CPU, bitsandbytes repacks the weight in place for a faster kernel,
            # rounding the block scales to bf16 (lossy, and it changes the frozen weights mid-run): keep the
            # standard layout, so evaluation never alters the model and resume stays exact.
            quantized.support_avx512bf16_for_cpu = False
            setattr(parent, name, quantized.to(child.weight.device))  # .to() runs the quantisation
            count += 1
    return count


def add_lora(module: nn.Module, targets, cfg) -> None:
    """Wrap the target linear layers of `module` with peft LoRA adapters (in place).

    peft's `inject_adapter_in_model` works on any nn.Module (no PreTrainedModel needed): it finds the
    submodules whose names end in one of `targets` and wraps them (a Linear4bit base gets peft's 4-bit
    LoRA layer). B starts at zero, so the wrapped model computes exactly what it did before.
    cfg: a TrainConfig, or anything with its lora_r, lora_alpha, lora_dropout and use_dora.
    """
    from peft import LoraConfig, inject_adapter_in_model

    names = {name.rsplit(".", 1)[-1] for name, m in module.named_modules() if name}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"LoRA targets {missing} are not module names in {type(module).__name__}; "
                         f"choose among e.g. {sorted(names)[:12]}")
    if is_quantized(module):
        # peft dispatches a Linear4bit base to its 4-bit LoRA layer only when the model says it is loaded in
        # 4 bits (transformers models set this flag); the generic layer would misread the packed weight.
        module.is_loaded_in_4bit = True
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=list(targets), use_dora=cfg.use_dora, bias="none")
    inject_adapter_in_model(config, module)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and return plain nn.Linear layers (in place).

    A 4-bit base is dequantised first, so the merged model is a float model: W' = dequant(W) + (alpha/r) B A
    (DoRA: rescaled per output by its magnitude). Deployment then needs neither peft nor bitsandbytes.
    """
    from peft.tuners.lora import LoraLayer

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                setattr(parent, name, _merged_linear(child))
    for parent in list(model.modules()):  # a 4-bit layer that had no adapter: back to float too
        for name, child in list(parent.named_children()):
            if _is_linear4bit(child):
                setattr(parent, name, _float_linear(child, _dequantized_weight(child)))
    return model


def _is_linear4bit(module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, bnb.nn.Linear4bit)


def _dequantized_weight(base: nn.Module) -> torch.Tensor:
    if _is_linear4bit(base):
        import bitsandbytes.functional as bnbf

        state = base.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked by an eval forward: restore the layout
            base.weight.data, state = bnbf._convert_weight_packed_for_cpu_inverse(base.weight.data, state)
            base.weight.quant_state = state
        return bnbf.dequantize_4bit(base.weight.data, state).float()
    return base.weight.data.float()


def _float_linear(base: nn.Module, weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=base.bias is not None, device=weight.device)
    linear.weight.data.copy_(weight)
    if base.bias is not None:
        linear.bias.data.copy_(base.bias.data.float())
    return linear.requires_grad_(False)


@torch.no_grad()
def _merged_linear(layer) -> nn.Linear:
    base = layer.get_base_layer()
    weight = _dequantized_weight(base)
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        if adapter in getattr(layer, "lora_variant", {}):  # DoRA: peft's own merge rule
            weight = layer.lora_variant[adapter].merge_safe(layer, adapter, weight)
        else:
            weight = weight + layer.get_delta_weight(adapter).float()
    return _float_linear(base, weight)
