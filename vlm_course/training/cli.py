"""Command line: `python -m vlm_course train ...` (the arguments map one to one onto TrainConfig).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ..data.collate import VLMCollator
from ..distributed import STRATEGIES, DistContext
from ..files import writable_folder_error, write_text_atomically
from ..lora import merge_lora
from .checkpoints import CHECKPOINT_PREFIX, checkpoint_dirs, latest_checkpoint
from .config import RECIPES, TrainConfig, set_seed
from .loss import make_loss_eval
from .recipes import apply_recipe
from .trainer import Trainer


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
    from ..data.cauldron import MIN_IMAGE_SIZE, load_cauldron, load_mini_cauldron

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



def check_output_folder(output_dir, resume: bool, option: str = "--output") -> None:
    """Before any work: a new run never goes into a folder holding another run, --resume needs a checkpoint there,
    and the folder must be writable (else the run would end with nothing saved). Raises ValueError saying what to do."""
    from ..vlm import recover_interrupted_save

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




def train_main(argv: list[str] | None = None) -> int:
    from ..processing import VLMProcessor
    from ..vlm import VisionLanguageModel
    from ..weight_files import apply_offline_env, tokenizer_problem

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
        run = {"train": cfg.to_dict(), "profile": args.profile, "system_prompt": args.system_prompt,
               "world_size": dist.world_size, "resumes": trainer.resumes}
        write_text_atomically(output / "train_config.json", json.dumps(run, indent=2) + "\n")
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
