"""What a training run does, in one dataclass: the recipe per component and how it trains.

    vision {frozen, full, lora}, projector {full, frozen}, decoder {frozen, lora, qlora, full}

as TinyLLaVA Factory offers; learning rates per component as nanoVLM sets them (projector 2e-3, backbones 1e-4).
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from ..distributed import STRATEGIES

DECODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
RECIPES = {
    "vision": ("frozen", "full", "lora"),
    "projector": ("full", "frozen"),
    "decoder": ("frozen", "lora", "qlora", "full"),
}
COMPONENTS = ("vision", "projector", "decoder")


@dataclass
class TrainConfig:
    # -- what trains: one recipe per component --
    vision: str = "frozen"  # frozen | full | lora
    projector: str = "full"  # full | frozen
    decoder: str = "lora"  # frozen | lora | qlora | full
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = DECODER_LORA_TARGETS  # decoder linear layers (HF Llama names)
    vision_lora_targets: tuple[str, ...] = VISION_LORA_TARGETS
    use_dora: bool = False  # DoRA: LoRA with a learned per-output magnitude (Idefics2 fine-tunes with it)
    double_quant: bool = True  # QLoRA: quantise the NF4 block scales too (~0.4 bit/param saved)
    # -- how: learning rates per component (nanoVLM: projector 2e-3, backbones 1e-4) --
    lr_projector: float = 2e-3
    lr_vision: float = 1e-4
    lr_decoder: float = 1e-4
    lr_lora: float = 2e-4  # adapters of any component
    # the fusion's new layers (cross-attention blocks); None: the projector's rate. Apart when the connector was
    # fitted first and should barely move while the new blocks, starting from random, must learn fast.
    lr_fusion: float | None = None
    weight_decay: float = 0.01  # never on norms, biases, or other 1-D parameters
    warmup_fraction: float = 0.03
    min_lr_ratio: float = 0.0  # cosine decays to this fraction of each group's lr
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    precision: str = "auto"  # "bf16" (autocast), "fp32", or "auto": bf16 where the hardware has it
    neftune_alpha: float | None = None  # NEFTune: uniform noise on text embeddings while training (e.g. 5)
    adam_betas: tuple[float, float] = (0.9, 0.999)  # PyTorch's default; (0.9, 0.95) adapts faster in short runs
    # QLoRA: the decoder's other frozen weights (embeddings = tied LM head, RMSNorm scales) in "float32", or in
    # "compute", the autocast dtype: with bf16 the residual stream then stays bf16 instead of being converted
    # around each of the 210 linear layers (a fifth of a CPU step in a profile of the demo).
    frozen_dtype: str = "float32"
    # -- loop --
    batch_size: int = 8  # rows per micro-batch; one optimiser step sees batch_size * grad_accum_steps rows
    max_steps: int = 100  # optimiser steps
    eval_every: int = 0  # 0: only at the end (when an eval_fn is given)
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 1
    max_length: int | None = None  # collator limit; None: the processor's config.max_length
    truncation: str = "drop"  # "drop" or "shorten_prompt" (see data/collate.py)
    # > 0: batches of similar length (data/batching.py), sorted within pools of this many batches; less padding.
    group_by_length: int = 0
    seed: int = 0
    output_dir: str = "runs/default"
    progress: bool = True  # tqdm bar
    log_every: int = 0  # > 0: also a plain log line every that many steps (for log files, where a bar is unreadable)
    strategy: str = "ddp"  # under torchrun: "ddp" (replicas) or "fsdp" (sharded weights); see vlm_course/distributed.py

    def __post_init__(self):
        for component, modes in RECIPES.items():
            if getattr(self, component) not in modes:
                raise ValueError(f"{component}={getattr(self, component)!r}: choose one of {modes}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        for name in ("batch_size", "max_steps", "grad_accum_steps", "lora_r", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        for name in ("lr_projector", "lr_vision", "lr_decoder", "lr_lora", "weight_decay", "lr_fusion"):
            value = getattr(self, name)
            if name == "lr_fusion" and value is None:
                continue
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}: a negative learning rate or weight "
                                 "decay climbs the loss instead of descending it (typical: lr 1e-4 to 2e-3, "
                                 "weight_decay 0.01)")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (or None: no clipping), got {self.max_grad_norm}")
        if self.neftune_alpha is not None and not self.neftune_alpha >= 0:
            raise ValueError(f"neftune_alpha must be >= 0 (or None: no noise), got {self.neftune_alpha}")
        if self.frozen_dtype not in ("float32", "compute"):
            raise ValueError(f"frozen_dtype must be 'float32' or 'compute', got {self.frozen_dtype!r}")
        if self.group_by_length < 0 or self.log_every < 0:
            raise ValueError("group_by_length and log_every must be >= 0 (0: off)")
        self.adam_betas = tuple(self.adam_betas)
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        self.lora_targets, self.vision_lora_targets = tuple(self.lora_targets), tuple(self.vision_lora_targets)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for autocast, or None for plain fp32. "auto" picks bf16 only where matmuls run natively in it."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    # On a CPU without bf16 instructions autocast still works, but emulated bf16 is slower than fp32.
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(
        torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if native else None
