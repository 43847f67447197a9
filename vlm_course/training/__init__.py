"""Training a VLM: recipes per component, optimiser groups, the loop, and checkpoints that resume exactly.

    config.py       TrainConfig: what trains (a recipe per component) and how (lr, schedule, ...); autocast_dtype
    recipes.py      apply_recipe: freeze / unfreeze / LoRA / QLoRA per component, as TinyLLaVA Factory offers:
                        vision {frozen, full, lora}, projector {full, frozen}, decoder {frozen, lora, qlora, full}
                    (the LoRA and 4-bit layers themselves are vlm_course/lora.py)
    optim.py        AdamW with one lr per component (projector 2e-3, backbones 1e-4, LoRA 2e-4); warmup + cosine
    loss.py         cross-entropy on answer tokens only; the held-out loss as an eval_fn
    trainer.py      Trainer / train: grad accumulation, clipping, bf16 autocast, NEFTune, tqdm, eval callback
    checkpoints.py  trainable weights (safetensors), optimiser, scheduler, RNG, data position; written to a
                    temporary folder and renamed into place (atomic)
    curves.py       the loss curve each run writes
    cli.py          `python -m vlm_course train ...`

Loss: cross-entropy on answer tokens only (the processor's labels), averaged over all answer tokens of the
whole optimiser step, so 4 micro-batches of 2 give the same gradient as one batch of 8.

Resume: an interrupted run resumed from its checkpoint reproduces the uninterrupted run's per-step losses and
weights bit for bit (tolerance 0) in fp32, in bf16 autocast and over an NF4 base (tests/test_training.py), on the
same machine, thread count and library versions; across machines, expect float-rounding differences only.

Everything is importable from here (`from vlm_course.training import Trainer, TrainConfig, add_lora`).
"""

from ..data.collate import VLMCollator
from ..data.sampler import SeededSampler
from ..files import writable_folder_error
from ..lora import add_lora, has_lora, is_lora_param, is_quantized, merge_lora, quantize_4bit
from .checkpoints import (
    CHECKPOINT_PREFIX,
    RESUME_APPLIED,
    RESUME_FREE,
    checkpoint_dirs,
    config_changes,
    frozen_fingerprint,
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    trainable_state,
)
from .cli import RUN_FILES, build_arg_parser, check_output_folder, run_artefacts, train_main
from .config import (
    COMPONENTS,
    DECODER_LORA_TARGETS,
    RECIPES,
    VISION_LORA_TARGETS,
    TrainConfig,
    autocast_dtype,
    set_seed,
)
from .curves import plot_loss_curve, smooth
from .loss import answer_loss_sum, make_loss_eval, neftune_noise
from .optim import build_optimizer, build_scheduler, component_of, lr_factor, param_groups
from .recipes import apply_recipe, trainable_counts
from .trainer import Trainer, check_processor, train

__all__ = [
    "CHECKPOINT_PREFIX", "COMPONENTS", "DECODER_LORA_TARGETS", "RECIPES", "RESUME_APPLIED", "RESUME_FREE", "RUN_FILES",
    "VISION_LORA_TARGETS", "SeededSampler", "TrainConfig", "Trainer", "VLMCollator", "add_lora", "answer_loss_sum",
    "apply_recipe", "autocast_dtype", "build_arg_parser", "build_optimizer", "build_scheduler", "check_output_folder",
    "check_processor", "checkpoint_dirs", "component_of", "config_changes", "frozen_fingerprint", "has_lora",
    "is_lora_param", "is_quantized", "latest_checkpoint", "load_checkpoint", "lr_factor", "make_loss_eval",
    "merge_lora", "neftune_noise", "param_groups", "plot_loss_curve", "quantize_4bit", "read_trainer_state",
    "rng_state", "run_artefacts", "save_checkpoint", "set_rng_state", "set_seed", "smooth", "train", "train_main",
    "trainable_counts", "trainable_state", "writable_folder_error",
]
