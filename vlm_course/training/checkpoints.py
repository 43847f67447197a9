"""Checkpoints that resume exactly: trainable weights, optimiser, scheduler, RNG and data position.

Each is written to a temporary folder, fsynced, and renamed into place (atomic), so a kill mid-save leaves the
previous checkpoint whole. Every file is checked (sizes, checksums) before a resume changes anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..distributed import DistContext
from ..files import file_sha256
from ..vlm import DIGEST_KEY, tensors_digest
from .config import TrainConfig

CHECKPOINT_PREFIX = "checkpoint-"


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
    weights / optimizer_state: already gathered (FSDP shards, see vlm_course/distributed.py) instead of read from the model.
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
        digests = {name: file_sha256(tmp / name) for name in ("optimizer.pt", "rng.pt")}
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
        if digests and name in digests and file_sha256(file) != digests[name]:
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
RESUME_FREE = ("output_dir", "progress", "log_every", "eval_every", "save_every", "keep_checkpoints", "strategy", "batch_size",
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
