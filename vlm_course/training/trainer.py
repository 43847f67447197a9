"""The training loop: gradient accumulation, clipping, bf16 autocast, NEFTune, progress bar, evaluation, saving.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..data.batching import LengthGroupedRows
from ..data.collate import VLMCollator
from ..distributed import DistContext
from ..processing import IGNORE_INDEX
from .checkpoints import (
    CHECKPOINT_PREFIX,
    checkpoint_dirs,
    config_changes,
    frozen_fingerprint,
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from .config import TrainConfig, autocast_dtype, set_seed
from .curves import plot_loss_curve
from .loss import answer_loss_sum
from .optim import build_optimizer, build_scheduler, lr_factor
from .recipes import apply_recipe


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

    Under torchrun (see vlm_course/distributed.py) the same code trains on every process: the loss goes through DDP/FSDP,
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
        self.sampler = self.row_source(train_rows)
        self.step = 0
        self.history: dict[str, list] = {"train": [], "eval": []}
        self.output_dir = Path(cfg.output_dir)
        self.resumes: list[dict] = []  # each resume: at which step, from where, which settings changed
        self.owns_output = False  # True once this trainer resumed from or saved into output_dir

    def row_source(self, rows):
        """This process's rows in training order: seeded shuffles (sharded under torchrun), or batches of similar
        length with cfg.group_by_length (one process; each row is encoded once here to know its length)."""
        if not self.cfg.group_by_length:
            return self.dist.row_source(rows, self.cfg.seed)
        if self.dist.world_size > 1 or not hasattr(rows, "__getitem__"):
            raise ValueError("group_by_length needs a list of rows on one process: drop it under torchrun or with "
                             "streamed data")
        lengths = [len(encoded["input_ids"]) if (encoded := self.collator.encode(row)) is not None else 0
                   for row in rows]
        self.collator.reset_counts()  # measuring is not training: the dropped/shortened counts start at zero
        return LengthGroupedRows(rows, lengths, self.cfg.batch_size, self.cfg.seed, self.cfg.group_by_length)

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
            if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == 1) and self.dist.is_main:
                print(f"step {self.step:4d} loss {record['loss']:.3f} grad-norm {record['grad_norm']:.2f} "
                      f"{record['seconds']:.1f} s/step", flush=True)
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
