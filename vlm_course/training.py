"""Training a VLM: recipes per component, optimiser groups, the loop, and checkpoints that resume exactly.

    TrainConfig           one dataclass: what trains (a recipe per component) and how (lr, schedule, ...)
    apply_recipe          freeze / unfreeze / LoRA / QLoRA per component, as TinyLLaVA Factory offers:
                              vision {frozen, full, lora}, projector {full, frozen},
                              decoder {frozen, lora, qlora, full}
    build_optimizer       AdamW with one lr per component (projector 2e-3, backbones 1e-4, LoRA 2e-4)
    build_scheduler       linear warmup, then cosine decay
    Trainer / train       the loop: grad accumulation, clipping, bf16 autocast, NEFTune, tqdm, eval callback
    save/load checkpoint  trainable weights (safetensors), optimiser, scheduler, RNG, data position;
                          written to a temporary folder and renamed into place (atomic)
    merge_lora            fold the adapters back into plain nn.Linear layers (for export and deployment)

QLoRA (Dettmers et al. 2023): the frozen decoder weights are stored as 4-bit NF4 (bitsandbytes Linear4bit,
dequantised on the fly for each matmul), and small LoRA matrices A (r x in) and B (out x r) are trained on
top in full precision: y = W_nf4 x + (alpha / r) * B A x. Memory for the base drops ~4x; gradients flow
through the dequantised base into the adapters only.

Loss: cross-entropy on answer tokens only (the processor's labels), averaged over all answer tokens of the
whole optimiser step, so 4 micro-batches of 2 give the same gradient as one batch of 8.

Resume: an interrupted run resumed from its checkpoint reproduces the uninterrupted run's per-step losses and
weights bit for bit (tolerance 0) in fp32, in bf16 autocast and over an NF4 base (tests/test_training.py), on the
same machine, thread count and library versions; across machines, expect float-rounding differences only.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlm_course.data.collate import VLMCollator
from vlm_course.distributed import STRATEGIES, DistContext
from vlm_course.processing import IGNORE_INDEX
from vlm_course.vlm import DIGEST_KEY, tensors_digest

DECODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
RECIPES = {
    "vision": ("frozen", "full", "lora"),
    "projector": ("full", "frozen"),
    "decoder": ("frozen", "lora", "qlora", "full"),
}
COMPONENTS = ("vision", "projector", "decoder")
CHECKPOINT_PREFIX = "checkpoint-"


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
    weight_decay: float = 0.01  # never on norms, biases, or other 1-D parameters
    warmup_fraction: float = 0.03
    min_lr_ratio: float = 0.0  # cosine decays to this fraction of each group's lr
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    precision: str = "auto"  # "bf16" (autocast), "fp32", or "auto": bf16 where the hardware has it
    neftune_alpha: float | None = None  # NEFTune: uniform noise on text embeddings while training (e.g. 5)
    # -- loop --
    batch_size: int = 8  # rows per micro-batch; one optimiser step sees batch_size * grad_accum_steps rows
    max_steps: int = 100  # optimiser steps
    eval_every: int = 0  # 0: only at the end (when an eval_fn is given)
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 1
    max_length: int | None = None  # collator limit; None: the processor's config.max_length
    truncation: str = "drop"  # "drop" or "shorten_prompt" (see data/collate.py)
    seed: int = 0
    output_dir: str = "runs/default"
    progress: bool = True  # tqdm bar
    strategy: str = "ddp"  # under torchrun: "ddp" (replicas) or "fsdp" (sharded weights); see distributed.py

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
        for name in ("lr_projector", "lr_vision", "lr_decoder", "lr_lora", "weight_decay"):
            value = getattr(self, name)
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


# ----------------------------------------------------------------------------------------------
# Recipes: what trains


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


def add_lora(module: nn.Module, targets, cfg: TrainConfig) -> None:
    """Wrap the target linear layers of `module` with peft LoRA adapters (in place).

    peft's `inject_adapter_in_model` works on any nn.Module (no PreTrainedModel needed): it finds the
    submodules whose names end in one of `targets` and wraps them (a Linear4bit base gets peft's 4-bit
    LoRA layer). B starts at zero, so the wrapped model computes exactly what it did before.
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

    # projector
    model.projector.requires_grad_(cfg.projector == "full")

    # decoder
    if cfg.decoder == "qlora" and not is_quantized(model.decoder):
        if has_lora(model.decoder):
            raise ValueError("the decoder already has LoRA on float weights: merge_lora(model) first, then qlora")
        dtype = autocast_dtype(cfg.precision, device) or torch.float32
        # Only the blocks: embeddings and the (tied) lm_head stay in float.
        quantize_4bit(model.decoder.layers, compute_dtype=dtype, double_quant=cfg.double_quant)
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


def _unfreeze_lora(module: nn.Module) -> None:
    for name, p in module.named_parameters():
        p.requires_grad_(is_lora_param(name))


def trainable_counts(model) -> dict[str, int]:
    """Trainable parameters per component (shared tensors counted once)."""
    counts = {}
    for component in COMPONENTS:
        params = {id(p): p for p in getattr(model, component).parameters() if p.requires_grad}
        counts[component] = sum(p.numel() for p in params.values())
    return counts


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


# ----------------------------------------------------------------------------------------------
# Optimiser and schedule


def component_of(name: str) -> str:
    return name.split(".", 1)[0]


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: one per (component, LoRA or full, decay or not), each with its lr.

    No weight decay on 1-D parameters (norm scales, biases, DoRA magnitudes): decaying them toward zero
    fights the normalisation they implement.
    """
    lrs = {"vision": cfg.lr_vision, "projector": cfg.lr_projector, "decoder": cfg.lr_decoder}
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
        return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of every group's lr at optimiser step `step` (0-based): linear warmup, then cosine."""
    warmup = math.ceil(cfg.warmup_fraction * cfg.max_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


# ----------------------------------------------------------------------------------------------
# Data order


class SeededSampler:
    """Rows in a fresh random order each epoch, fixed by (seed, epoch); its position can be saved and restored."""

    def __init__(self, num_rows: int, seed: int):
        if num_rows < 1:
            raise ValueError("no training rows: check the data path and subsets")
        self.num_rows, self.seed = num_rows, seed
        self.epoch, self.position = 0, 0

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_rows, generator=generator).tolist()

    def take(self, n: int) -> list[int]:
        indices = []
        while len(indices) < n:
            if self.position == self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
            order = self.order(self.epoch)
            chunk = order[self.position:self.position + n - len(indices)]
            indices += chunk
            self.position += len(chunk)
        return indices

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_rows": self.num_rows, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if (state["num_rows"], state["seed"]) != (self.num_rows, self.seed):
            raise ValueError(f"the checkpoint was trained on {state['num_rows']} rows with seed {state['seed']}, "
                             f"this run has {self.num_rows} rows and seed {self.seed}: resume with the same data")
        self.epoch, self.position = state["epoch"], state["position"]


# ----------------------------------------------------------------------------------------------
# Loss


def neftune_noise(embeds: torch.Tensor, text_mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """NEFTune (Jain et al. 2023): uniform noise of scale alpha / sqrt(L * d) on each sample's text embeddings.

    L is the sample's number of real tokens, d the width. Image features are left clean (Idefics2 noises the
    text embeddings). Only in training: evaluation and generation never call this.
    """
    lengths = text_mask.sum(dim=1, keepdim=True).clamp(min=1).unsqueeze(-1)  # (B, 1, 1)
    scale = alpha / torch.sqrt(lengths * embeds.shape[-1])
    noise = torch.empty_like(embeds).uniform_(-1, 1) * scale
    return embeds + noise * text_mask.unsqueeze(-1)


def answer_loss_sum(model, batch: dict, neftune_alpha: float | None = None) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's answer tokens, and their count.

    The LM head runs only at answer positions: the vocabulary is 49152 wide, so logits for every position
    would cost (B x T x 49152) floats and a large share of the FLOPs for nothing.
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    embeds = model.embed(input_ids, batch.get("pixel_values"))
    if neftune_alpha:
        text = (input_ids != model.image_token_id) & attention_mask.bool()
        embeds = neftune_noise(embeds, text.to(embeds.dtype), neftune_alpha)
    out = model.decoder(inputs_embeds=embeds, attention_mask=attention_mask, logits_to_keep=1)
    targets = labels[:, 1:]  # position t predicts token t + 1
    keep = targets != IGNORE_INDEX
    logits = model.decoder.lm_head(out.hidden_states[:, :-1][keep])
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, int(keep.sum())


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dirs(output_dir) -> list[Path]:
    """Complete checkpoints in output_dir, oldest first (temporary folders of an interrupted save are ignored)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(output_dir) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        # numpy's key array goes in as a tensor: torch.load(weights_only=True) refuses numpy objects.
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def frozen_fingerprint(model) -> list[float]:
    """Cheap checksum of the frozen weights: resuming on a different base model must fail, not drift."""
    total, absolute = 0.0, 0.0
    for _, p in model.named_parameters():
        if not p.requires_grad:
            data = p.detach().double() if p.is_floating_point() else p.detach().to(torch.float64)
            total += float(data.sum())
            absolute += float(data.abs().sum())
    return [total, absolute]


def save_checkpoint(output_dir, step: int, model, optimizer, scheduler, trainer_state: dict,
                    keep: int = 1, weights: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """Write a checkpoint atomically: a temporary folder, fsync, then os.replace to checkpoint-<step>.

    A crash before the rename leaves only a `.tmp-` folder (ignored, removed by the next save): the previous
    checkpoint stays intact. Older checkpoints are deleted only after the new one is in place.
    weights / optimizer_state: already gathered (FSDP shards, see distributed.py) instead of read from the model.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob(f".tmp-{CHECKPOINT_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=output_dir, prefix=f".tmp-{CHECKPOINT_PREFIX}{step:06d}-"))
    try:
        weights = trainable_state(model) if weights is None else weights
        optimizer_state = optimizer.state_dict() if optimizer_state is None else optimizer_state
        save_file(weights, tmp / "trainable.safetensors", metadata={"step": str(step), DIGEST_KEY: tensors_digest(weights)})
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        digests = {name: _file_sha256(tmp / name) for name in ("optimizer.pt", "rng.pt")}
        with open(tmp / "trainer_state.json", "w") as f:  # written last: it marks a complete checkpoint
            json.dump(dict(trainer_state, step=step, sha256=digests), f)
        for file in tmp.iterdir():
            _fsync(file)
        _fsync(tmp)
        if final.exists():  # re-saving the same step: move the old copy aside (into an ignored name) first
            os.replace(final, tmp.with_name(tmp.name + "-old"))
        os.replace(tmp, final)
        _fsync(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _damaged(path: Path, what: str) -> ValueError:
    """The error for a checkpoint that cannot be read, with the way out: an earlier checkpoint, or a new run."""
    earlier = [d for d in checkpoint_dirs(path.parent) if d.name < path.name]
    fix = (f"delete {path} (or move it away) to resume from {earlier[-1]}" if earlier else
           "there is no earlier checkpoint: start a new run in another output folder (CLI: another --output)")
    return ValueError(f"checkpoint {path} is damaged: {what}. Fix: {fix}")


def read_trainer_state(path) -> dict:
    """trainer_state.json of a checkpoint, checked (a damaged file is named, with what to do)."""
    path = Path(path)
    file = path / "trainer_state.json"
    if not file.exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.json)")
    try:
        state = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _damaged(path, f"{file.name} is not valid JSON ({err})") from err
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise _damaged(path, f"{file.name} has no integer 'step'")
    return state


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _read_checkpoint_files(path: Path, with_optimizer: bool, digests: dict | None = None
                           ) -> tuple[dict, dict | None, dict | None]:
    """(weights, optimizer+scheduler state, rng state), every file checked (against the checksums recorded in
    trainer_state.json and in the safetensors header, when the checkpoint has them) before anything is changed."""
    file = path / "trainable.safetensors"
    if not file.exists():
        raise _damaged(path, f"{file.name} is missing")
    try:
        weights = load_file(file)
        with safe_open(file, framework="pt") as f:
            recorded = (f.metadata() or {}).get(DIGEST_KEY)
    except Exception as err:  # safetensors' own error types for a truncated or foreign file
        raise _damaged(path, f"{file.name} is not a readable safetensors file ({err})") from err
    if recorded is not None and tensors_digest(weights) != recorded:
        raise _damaged(path, f"{file.name} no longer matches the checksum recorded when it was saved")
    if not with_optimizer:
        return weights, None, None
    loaded = []
    for name, keys in (("optimizer.pt", ("optimizer", "scheduler")), ("rng.pt", ("torch", "python", "numpy"))):
        file = path / name
        if not file.exists():
            raise _damaged(path, f"{name} is missing (the optimiser and RNG state are needed to resume exactly)")
        if digests and name in digests and _file_sha256(file) != digests[name]:
            raise _damaged(path, f"{name} no longer matches the checksum recorded in trainer_state.json")
        try:
            value = torch.load(file, weights_only=True)
        except Exception as err:  # truncated zip, foreign pickle refused by weights_only, ...
            raise _damaged(path, f"{name} is not readable ({type(err).__name__}: {str(err)[:200]})") from err
        if not isinstance(value, dict) or any(k not in value for k in keys):
            raise _damaged(path, f"{name} lacks {[k for k in keys if k not in (value or {})]}")
        loaded.append(value)
    return weights, loaded[0], loaded[1]


def load_checkpoint(path, model, optimizer=None, scheduler=None, distributed: DistContext | None = None) -> dict:
    """Restore trainable weights (+ optimiser, scheduler, RNG when given); returns the trainer state.
    Checkpoints hold full tensors whatever wrote them; under FSDP each process keeps its shards of them.
    Every file is read and checked first: a damaged or mismatching checkpoint raises and changes nothing."""
    path = Path(path)
    state = read_trainer_state(path)
    weights, saved, rng = _read_checkpoint_files(path, with_optimizer=optimizer is not None,
                                                 digests=state.get("sha256"))
    params = dict(model.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != wanted:
        missing, extra = sorted(wanted - set(weights)), sorted(set(weights) - wanted)
        raise ValueError(f"checkpoint {path} does not match the model's trainable parameters (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}): apply the same recipe (TrainConfig) as the run that saved it")
    wrong = [f"{n}: checkpoint {tuple(t.shape)}, model {tuple(params[n].shape)}" for n, t in weights.items()
             if tuple(t.shape) != tuple(params[n].shape)]
    if wrong:
        raise ValueError(f"checkpoint {path} has other tensor sizes than this model ({len(wrong)} differ, e.g. "
                         f"{wrong[0]}): a different lora_r (--lora-r) or profile? Resume with the settings of the "
                         "run that saved it (its trainer_state.json has them under 'config')")
    optimizer_state = saved["optimizer"] if saved else None
    # FSDP loads the full tensors into each process's shards; otherwise copy them in place.
    if distributed is None or not distributed.load_checkpoint_state(weights, optimizer_state, optimizer):
        if optimizer is not None:
            try:  # before the weights: a mismatching optimiser state then leaves the model untouched
                optimizer.load_state_dict(optimizer_state)
            except (ValueError, KeyError, RuntimeError) as err:
                raise _damaged(path, f"optimizer.pt does not fit this optimiser ({err})") from err
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
    if saved is not None:
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(rng)
    return state


# Settings a resumed run may change freely: they do not alter what is computed. batch_size and
# grad_accum_steps may change with the number of processes as long as the global batch stays the same
# (DistContext.check_resume). max_steps is applied (the schedule is recomputed) and recorded.
RESUME_FREE = ("output_dir", "progress", "eval_every", "save_every", "keep_checkpoints", "strategy", "batch_size",
               "grad_accum_steps")
RESUME_APPLIED = ("max_steps",)


def config_changes(saved: dict, cfg: TrainConfig, path) -> dict[str, tuple]:
    """{name: (saved, now)} for the settings a resume applies; ValueError for any other difference."""
    applied, refused = {}, {}
    for field in dataclasses.fields(TrainConfig):
        if field.name not in saved or field.name in RESUME_FREE:
            continue
        before, now = saved[field.name], getattr(cfg, field.name)
        if isinstance(now, tuple):
            before = tuple(before) if isinstance(before, (list, tuple)) else before
        if before != now:
            (applied if field.name in RESUME_APPLIED else refused)[field.name] = (before, now)
    if refused:
        listed = "; ".join(f"{name} (--{name.replace('_', '-')}): {b!r} in the checkpoint, {n!r} now"
                           for name, (b, n) in refused.items())
        raise ValueError(
            f"cannot resume {path} with other settings ({listed}): resuming continues the same run, so use the same "
            "recipe and settings as the run that saved it (drop or fix these options), or start a new run in another "
            "output folder (CLI: another --output)")
    return applied


# ----------------------------------------------------------------------------------------------
# The trainer


def check_processor(model, processor) -> None:
    """The model must know the processor's <image> id (a processor built from another config copy sets it).
    processor may be None when the Trainer gets a ready collator."""
    if processor is None:
        return
    if model.config.image_token_id is None:
        model.config.image_token_id = processor.image_token_id
    elif model.config.image_token_id != processor.image_token_id:
        raise ValueError(f"the model's image_token_id {model.config.image_token_id} differs from the processor's "
                         f"{processor.image_token_id}: build the processor with VLMProcessor.from_config(model.config)")


class Trainer:
    """The training loop. `fit()` runs to cfg.max_steps; `resume()` first continues from the latest checkpoint.

    eval_fn(model, step) -> dict of metrics, called (in eval mode, without gradients) every cfg.eval_every
    steps and at the end; its results go into history["eval"].

    Under torchrun (see distributed.py) the same code trains on every process: the loss goes through DDP/FSDP,
    each process reads its own slice of every global batch, and only rank 0 writes. train_rows is a list (shuffled
    and sharded here) or a stream already split per process (load_cauldron(streaming=True, rank=, world_size=)).
    """

    def __init__(self, model, processor, train_rows, cfg: TrainConfig, eval_fn=None, collator=None,
                 distributed: DistContext | None = None):
        self.model, self.processor, self.rows, self.cfg, self.eval_fn = model, processor, train_rows, cfg, eval_fn
        self.dist = distributed or DistContext.from_env(cfg.strategy)  # one process unless launched by torchrun
        check_processor(model, processor)
        self.dist.place(model)
        set_seed(cfg.seed)  # LoRA initialisation and dropout draw from the global RNG
        self.trainable = apply_recipe(model, cfg)
        self.device = next(model.parameters()).device
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        self.collator = collator or VLMCollator(processor, cfg.max_length, cfg.truncation)
        self.fingerprint = frozen_fingerprint(model)  # frozen weights never change; FSDP would shard them later
        self.loss_module = self.dist.wrap(model, answer_loss_sum)  # DDP/FSDP sync gradients inside backward()
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.sampler = self.dist.row_source(train_rows, cfg.seed)  # this process's rows
        self.step = 0
        self.history: dict[str, list] = {"train": [], "eval": []}
        self.output_dir = Path(cfg.output_dir)
        self.resumes: list[dict] = []  # each resume: at which step, from where, which settings changed
        self.owns_output = False  # True once this trainer resumed from or saved into output_dir

    # -- state ----------------------------------------------------------------------------------

    def state(self) -> dict:
        return {"history": self.history, "sampler": self.sampler.state_dict(), "config": self.cfg.to_dict(),
                "frozen_fingerprint": self.fingerprint, "world_size": self.dist.world_size, "resumes": self.resumes}

    def save(self) -> Path:
        """Rank 0 writes the checkpoint (atomically); the other processes wait until it is in place."""
        gathered = self.dist.checkpoint_state(self.model, self.optimizer)  # FSDP: collective gather to rank 0
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{self.step:06d}"
        if self.dist.is_main:
            weights, optimizer_state = gathered or (None, None)
            final = save_checkpoint(self.output_dir, self.step, self.model, self.optimizer, self.scheduler,
                                    self.state(), keep=self.cfg.keep_checkpoints, weights=weights,
                                    optimizer_state=optimizer_state)
        self.dist.barrier()
        self.owns_output = True
        return final

    def resume(self, path=None) -> bool:
        """Continue from `path` or the latest checkpoint in output_dir; False when there is none.

        The settings must be those of the run that saved the checkpoint (a ValueError lists the differences),
        except RESUME_FREE ones (how often to evaluate and save, ...) and max_steps: a new max_steps is applied,
        the schedule (warmup + cosine) recomputed for it from the current step on, and recorded in `resumes`.
        """
        path = Path(path) if path else latest_checkpoint(self.output_dir)
        if path is None:
            return False
        saved = read_trainer_state(path)
        changed = config_changes(saved.get("config") or {}, self.cfg, path)  # raises on a change altering the run
        self.dist.check_resume(saved, self.cfg)
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler, distributed=self.dist)
        if not np.allclose(state["frozen_fingerprint"], self.fingerprint, rtol=1e-9, atol=1e-6):
            raise ValueError(f"the frozen weights differ from those of the run that saved {path}: build the model "
                             "the same way (same profile, same seed for random initialisation) before resuming")
        self.step, self.history = state["step"], state["history"]
        self.sampler.load_state_dict(state["sampler"])
        self.resumes = list(state.get("resumes", []))
        if "max_steps" in changed:
            # The saved lr of every group follows the old schedule: put it on the new one from this step on.
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = base * lr_factor(self.step, self.cfg)
        self.resumes.append({"step": self.step, "checkpoint": path.name,
                             "changed": {k: list(v) for k, v in changed.items()}})
        self.owns_output = True
        return True

    # -- one step -------------------------------------------------------------------------------

    def next_micro_batches(self) -> list[dict]:
        batches = []
        for _ in range(self.cfg.grad_accum_steps):
            batch = self.collator(self.sampler.next_rows(self.cfg.batch_size))
            batches.append({k: v.to(self.device) for k, v in batch.items()})
        return batches

    def train_step(self) -> dict:
        """One optimiser step over grad_accum_steps micro-batches; returns its log record."""
        start = time.perf_counter()
        self.model.train()
        self.dist.reseed(self.cfg.seed, self.step)
        batches = self.next_micro_batches()
        local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        answer_tokens = int(self.dist.sum(local_tokens)[0])  # over all processes
        if answer_tokens == 0:
            raise ValueError("this step's batches have no answer tokens: check the labels (processor) and data")
        total = 0.0
        for i, batch in enumerate(batches):
            with self.dist.no_sync(sync=i == len(batches) - 1), torch.autocast(
                    self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                loss_sum, _ = self.loss_module(batch, self.cfg.neftune_alpha)
            # Divide by the answer tokens of the WHOLE step (all micro-batches, all processes): accumulation then
            # equals one big batch. DDP averages gradients over processes, so multiply by their number.
            (loss_sum * (self.dist.world_size / answer_tokens)).backward()
            total += loss_sum.item()
        total, tokens = self.dist.sum(total, sum(int(b["attention_mask"].sum()) for b in batches))
        loss = total / answer_tokens
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss} at step {self.step + 1}: lower the learning rates, add warmup "
                "(warmup_fraction), or use precision='fp32' to rule out bf16 overflow")
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        seconds = time.perf_counter() - start
        record = {"step": self.step, "loss": loss, "grad_norm": grad_norm, "lr": lrs, "tokens": int(tokens),
                  "answer_tokens": answer_tokens, "seconds": seconds}
        self.history["train"].append(record)
        return record

    def evaluate(self) -> dict | None:
        if self.eval_fn is None:
            return None
        self.model.eval()
        with torch.no_grad(), self.dist.unsharded():  # every process evaluates (FSDP needs them all)
            metrics = self.eval_fn(self.model, self.step) or {}
        self.model.train()
        self.history["eval"].append({"step": self.step, **metrics})
        return metrics

    # -- the loop -------------------------------------------------------------------------------

    def fit(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        existing = checkpoint_dirs(self.output_dir) if not self.owns_output else []
        if existing:
            raise FileExistsError(
                f"{self.output_dir} already holds a training run (latest {existing[-1].name}): a new run there would "
                "mix the two (checkpoint rotation keeps the higher step, so a later resume would continue the other "
                "run). Continue it with trainer.resume() (CLI: --resume), or train into another output_dir "
                "(CLI: another --output)")
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", disable=not (cfg.progress and self.dist.is_main),
                   dynamic_ncols=True)
        last_eval = last_save = None
        while self.step < cfg.max_steps:
            record = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{max(record['lr'].values()):.2e}",
                            tok_s=f"{record['tokens'] / record['seconds']:.0f}")
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                metrics, last_eval = self.evaluate(), self.step
                if metrics and self.dist.is_main:
                    bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save()
                last_save = self.step
        bar.close()
        if self.eval_fn is not None and last_eval != self.step:
            self.evaluate()
        latest = latest_checkpoint(self.output_dir)
        unsaved = last_save != self.step and (latest is None or latest.name != f"{CHECKPOINT_PREFIX}{self.step:06d}")
        if self.dist.sum(float(unsaved))[0] > 0:  # decided together: saving is collective (barrier, FSDP gather)
            self.save()
        if self.dist.is_main:
            self.write_curve()
        return self.history

    def write_curve(self) -> Path:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fig = plot_loss_curve(self.history)
        path = self.output_dir / "loss_curve.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        with open(self.output_dir / "history.json", "w") as f:
            json.dump(self.history, f)
        return path


def train(model, processor, train_rows, cfg: TrainConfig, eval_fn=None, resume: bool = False) -> dict:
    """Apply the recipe, train to cfg.max_steps (continuing from the latest checkpoint with resume=True),
    save the final checkpoint and the loss curve in cfg.output_dir; returns the history."""
    trainer = Trainer(model, processor, train_rows, cfg, eval_fn=eval_fn)
    if resume:
        trainer.resume()
    return trainer.fit()


# ----------------------------------------------------------------------------------------------
# Plots and evaluation helpers


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_loss_curve(history: dict, title: str = "training loss"):
    """Loss per step (raw and smoothed), the lr schedule, and eval metrics when there are any."""
    from matplotlib.figure import Figure

    train_log = history.get("train", [])
    evals = history.get("eval", [])
    metric_names = sorted({k for e in evals for k in e if k != "step"})
    fig = Figure(figsize=(9 if metric_names else 6, 3.6))
    axes = fig.subplots(1, 2 if metric_names else 1, squeeze=False)[0]
    ax = axes[0]
    steps = [r["step"] for r in train_log]
    losses = [r["loss"] for r in train_log]
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, label="loss")
    if losses:
        ax.plot(steps, smooth(losses), color="tab:blue", label="smoothed")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("answer-token cross-entropy")
    ax.set_title(title)
    if train_log:
        lr_ax = ax.twinx()
        lr_ax.plot(steps, [max(r["lr"].values()) for r in train_log], color="tab:gray", linestyle=":",
                   label="max lr")
        lr_ax.set_ylabel("learning rate", color="tab:gray")
    ax.legend(loc="upper right")
    if metric_names:
        for name in metric_names:
            points = [(e["step"], e[name]) for e in evals if name in e]
            axes[1].plot(*zip(*points), marker="o", label=name)
        axes[1].set_xlabel("optimiser step")
        axes[1].set_title("evaluation")
        axes[1].legend()
    fig.tight_layout()
    return fig


def make_loss_eval(collator: VLMCollator, rows, batch_size: int = 8, precision: str = "fp32"):
    """An eval_fn computing the answer-token loss on held-out rows (mean over all their answer tokens)."""

    def eval_fn(model, step):
        device = next(model.parameters()).device
        dtype = autocast_dtype(precision, device)
        total, count = 0.0, 0
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collator(list(rows[i:i + batch_size])).items()}
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss_sum, n = answer_loss_sum(model, batch)
            total, count = total + loss_sum.item(), count + n
        return {"eval_loss": total / max(count, 1)}

    return eval_fn


# ----------------------------------------------------------------------------------------------
# CLI: python -m vlm_course train ...


def build_arg_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m vlm_course train", description="Train a VLM on the_cauldron "
                                "or the offline mini-cauldron, with a recipe per component.")
    p.add_argument("--profile", default=None, help="tiny | smol | nano (default: VLM_COURSE_PROFILE or hardware)")
    p.add_argument("--data", default="mini-cauldron",
                   help="mini-cauldron (offline, assets/), the_cauldron (hub), or a folder of <subset>/train*.parquet")
    p.add_argument("--subsets", default=None, help="comma-separated subset names (default: all mini-cauldron ones)")
    p.add_argument("--max-per-subset", type=int, default=None, help="cap rows per subset")
    p.add_argument("--eval-rows", type=int, default=64, help="held-out rows for the eval loss (0: no eval)")
    p.add_argument("--output", default=d.output_dir, help="output folder (checkpoints, loss curve, model)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    p.add_argument("--system-prompt", default=None, help="system prompt (default: none, saves tokens)")
    p.add_argument("--no-save-model", action="store_true", help="skip writing the merged model to <output>/model")
    for component, modes in RECIPES.items():
        p.add_argument(f"--{component}", choices=modes, default=getattr(d, component))
    for name in ("max_steps", "batch_size", "grad_accum_steps", "lora_r", "lora_alpha", "eval_every",
                 "save_every", "keep_checkpoints", "seed", "max_length"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    for name in ("lr_projector", "lr_vision", "lr_decoder", "lr_lora", "lora_dropout", "weight_decay",
                 "warmup_fraction", "max_grad_norm", "neftune_alpha"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=d.precision)
    p.add_argument("--truncation", choices=("drop", "shorten_prompt"), default=d.truncation)
    p.add_argument("--use-dora", action="store_true")
    p.add_argument("--no-double-quant", action="store_true")
    p.add_argument("--strategy", choices=STRATEGIES, default=d.strategy,
                   help="under torchrun: ddp (a replica per process) or fsdp (weights sharded over processes)")
    p.add_argument("--streaming", action="store_true",
                   help="stream the_cauldron (or a folder) instead of loading it, split across processes")
    return p


def _load_rows(args, split: str, limit: int | None, dist: DistContext | None = None, min_image_size: int | None = None):
    """Rows for the CLI. With --streaming and a DistContext: this process's split of the train stream.
    min_image_size (the model's patch size): smaller images are skipped and counted, not a crash mid-run."""
    from vlm_course.data.cauldron import MIN_IMAGE_SIZE, load_cauldron, load_mini_cauldron

    verbose = dist is None or dist.is_main
    subsets = args.subsets.split(",") if args.subsets else None
    if args.data == "mini-cauldron":
        if args.streaming:
            raise SystemExit("--streaming is for --data the_cauldron or a folder; the mini-cauldron is loaded whole")
        return load_mini_cauldron(split, subsets=subsets, max_per_subset=limit, verbose=verbose,
                                  min_image_size=min_image_size or MIN_IMAGE_SIZE)
    if not subsets:
        raise SystemExit("--subsets is required with --data the_cauldron or a folder, e.g. --subsets vsr,ai2d")
    data_dir = None if args.data == "the_cauldron" else args.data
    common = dict(max_samples=limit, data_dir=data_dir, streaming=args.streaming, seed=args.seed, verbose=verbose,
                  min_image_size=min_image_size or MIN_IMAGE_SIZE)
    if split == "test" and data_dir is None:  # the hub has only train: hold out a deterministic 2%
        return load_cauldron(subsets, split="validation", val_fraction=0.02, **common)
    shard = dict(rank=dist.rank, world_size=dist.world_size) if args.streaming and dist and split == "train" else {}
    return load_cauldron(subsets, split=split, val_fraction=0.02 if data_dir is None else 0.0, **common, **shard)


RUN_FILES = ("history.json", "train_config.json", "loss_curve.png", "model")


def run_artefacts(output_dir) -> list[str]:
    """What of a training run a folder holds: checkpoint folders and the files `train` writes."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return [p.name for p in checkpoint_dirs(output_dir)] + [n for n in RUN_FILES if (output_dir / n).exists()]


def writable_folder_error(folder: Path, option: str) -> str | None:
    """Why `folder` cannot be the output folder (a file, under a file, not writable), or None. Creates nothing:
    the probe file goes into the folder, or into its nearest existing parent, and is gone at once."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return f"{option} {folder} is a file, not a folder: choose a folder path for {option}"
    ancestor = next((p for p in [folder.absolute(), *folder.absolute().parents] if p.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        return f"{option} {folder}: {ancestor} is a file, so the folder cannot be created there: choose another {option}"
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as err:
        return (f"{option} {folder} is not writable ({err.strerror or err}): choose a folder you can write to, "
                "or fix its permissions")
    return None


def check_output_folder(output_dir, resume: bool, option: str = "--output") -> None:
    """Before any work: a new run never goes into a folder holding another run, --resume needs a checkpoint there,
    and the folder must be writable (else the run would end with nothing saved). Raises ValueError saying what to do."""
    from vlm_course.vlm import recover_interrupted_save

    output_dir = Path(output_dir)
    if output_dir.is_dir():
        recover_interrupted_save(output_dir / "model")  # a kill during the last run's final model write
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"{option} {output_dir} is a file, not a folder: choose a folder path for {option}")
    found = run_artefacts(output_dir)
    if resume and latest_checkpoint(output_dir) is None:
        interrupted = output_dir.is_dir() and any(output_dir.glob(f".tmp-{CHECKPOINT_PREFIX}*"))
        raise ValueError(
            f"--resume: there is no complete checkpoint in {output_dir} to continue from"
            + (" (a save was interrupted before the first checkpoint was complete)" if interrupted else "")
            + (f"; it holds {found}" if found else "")
            + f". Drop --resume to start a new run, or point {option} at the folder of the run to continue")
    if not resume and found:
        raise ValueError(
            f"{option} {output_dir} already holds a training run ({', '.join(found)}): a new run there would mix "
            f"the two. Continue that run with --resume, or start a new one in another {option} folder")
    error = writable_folder_error(output_dir, option)
    if error:
        raise ValueError(error)


def _join_negative_numbers(argv: list[str]) -> list[str]:
    """["--lr-lora", "-1e-4"] -> ["--lr-lora=-1e-4"]: argparse takes a negative number written with an exponent for
    an option ("expected one argument"), so it would never reach the check that explains what is wrong with it."""
    import re

    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        if (token.startswith("--") and "=" not in token and i + 1 < len(argv)
                and re.fullmatch(r"-(\d+\.?\d*|\.\d+)[eE][-+]?\d+|-(inf|nan)", argv[i + 1])):
            out.append(f"{token}={argv[i + 1]}")
            i += 2
        else:
            out.append(token)
            i += 1
    return out


def _write_json_atomically(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def train_main(argv: list[str] | None = None) -> int:
    import sys

    from vlm_course.processing import VLMProcessor
    from vlm_course.vlm import VisionLanguageModel
    from vlm_course.weights import apply_offline_env, tokenizer_problem

    apply_offline_env()
    args = build_arg_parser().parse_args(_join_negative_numbers(sys.argv[1:] if argv is None else list(argv)))
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    try:  # everything that can go wrong before the first step: say what and how to fix it, no traceback
        cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}, output_dir=args.output,
                          double_quant=not args.no_double_quant)
        check_output_folder(cfg.output_dir, args.resume)
        if tokenizer_problem():
            raise ValueError(tokenizer_problem())
        dist = DistContext.from_env(cfg.strategy)  # before any .cuda(): picks this process's GPU under torchrun
        say = print if dist.is_main else (lambda *a, **k: None)  # only rank 0 talks
        set_seed(cfg.seed)  # random-init profiles (tiny) must build the same weights when resuming (and everywhere)
        model = VisionLanguageModel.from_profile(args.profile)
        if torch.cuda.is_available():
            model.cuda()
        processor = VLMProcessor.from_config(model.config, system_prompt=args.system_prompt)
        patch = model.config.vision.patch_size
        rows = _load_rows(args, "train", args.max_per_subset, dist, patch)
        eval_fn = None
        if args.eval_rows:
            try:
                held_out = list(_load_rows(args, "test", args.eval_rows if args.streaming else None, dist, patch))
            except FileNotFoundError as err:
                say(f"no held-out split ({err}); training without eval")
            else:
                held_out = [held_out[i] for i in np.linspace(0, len(held_out) - 1,
                                                              min(args.eval_rows, len(held_out)), dtype=int)]
                eval_fn = make_loss_eval(VLMCollator(processor, cfg.max_length, "drop"), held_out, cfg.batch_size,
                                         cfg.precision)
        trainer = Trainer(model, processor, rows, cfg, eval_fn=eval_fn, distributed=dist)
        if args.resume and trainer.resume():
            say(f"resumed at step {trainer.step} from {latest_checkpoint(cfg.output_dir)}")
            for name, (before, now) in trainer.resumes[-1]["changed"].items():
                say(f"{name} changed from {before} to {now}: applied; the warmup + cosine schedule is recomputed for "
                    f"{now} steps from step {trainer.step} on (so the run differs from one trained with {now} steps "
                    "from the start); recorded under 'resumes' in train_config.json")
            if trainer.step >= cfg.max_steps:
                say(f"the checkpoint is already at step {trainer.step} >= --max-steps {cfg.max_steps}: nothing to "
                    "train (raise --max-steps to train further)")
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"train: {err}", file=sys.stderr)
        return 2
    say(f"trainable parameters: {trainer.trainable}" + (f"; {dist.world_size} processes ({cfg.strategy})"
                                                          if dist.enabled else ""))
    history = trainer.fit()
    say(trainer.collator.summary())
    output = Path(cfg.output_dir)
    export = None if args.no_save_model else dist.full_model(trainer, apply_recipe)  # FSDP: collective gather
    if dist.is_main:
        _write_json_atomically(output / "train_config.json", {
            "train": cfg.to_dict(), "profile": args.profile, "system_prompt": args.system_prompt,
            "world_size": dist.world_size, "resumes": trainer.resumes})
        if export is not None:
            merge_lora(export).save_pretrained(output / "model")
    dist.barrier()
    dist.close()
    losses = [r["loss"] for r in history["train"]]
    last_eval = history["eval"][-1] if history["eval"] else {}
    line = f"done: step {trainer.step}, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    if "eval_loss" in last_eval:
        line += f", eval_loss {last_eval['eval_loss']:.3f}"
    say(f"{line}; curve {output / 'loss_curve.png'}; checkpoint {latest_checkpoint(output)}")
    return 0
