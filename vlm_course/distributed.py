"""Training on several processes (GPUs, nodes) with the standard engine: torchrun + DistributedDataParallel.

The same training code runs on one process and under a launcher. `DistContext.from_env()` reads the variables
that `torchrun` (and `accelerate launch`, which calls torchrun underneath) sets in every process:

    RANK        this process's number, 0 .. WORLD_SIZE - 1 (rank 0 is the "main" process)
    WORLD_SIZE  how many processes train together
    LOCAL_RANK  this process's number on its own machine: which GPU it drives

Without them it is a one-process context whose every method is a no-op, so `Trainer` behaves exactly as before.

What changes with N processes (data parallelism):

    model     each process holds a replica, wrapped in DDP: backward() averages the gradients over processes
              (an all-reduce, overlapped with the backward pass), so every replica takes the same step.
              strategy="fsdp" instead shards parameters, gradients and optimiser state over processes
              (FSDP2 `fully_shard`, one unit per transformer block): for decoders that do not fit on one GPU.
    data      each process reads a different slice of each global batch (`ShardedRows`, or a streamed
              the_cauldron split with `datasets.distributed.split_dataset_by_node`, see data/cauldron.py).
    loss      the answer-token count of the whole global batch is all-reduced first, so the synchronised gradient
              equals the gradient of one process on the combined batch (not a mean of per-process means).
    writes    only rank 0 writes checkpoints, figures and logs; the others wait at a barrier.

Why torchrun + DDP (not `accelerate launch` + Accelerator) as the primary path: the course builds everything
in plain PyTorch, and DDP is ~5 visible lines here (wrap, no_sync, all_reduce, barrier) that a learner can
read; QLoRA needs nothing special under it (the frozen NF4 weights have requires_grad=False, so DDP never
reduces them, and every LoRA parameter is used in every step, so find_unused_parameters stays False).
static_graph is not needed either: it exists for graphs DDP cannot follow (reentrant activation checkpointing,
parameters used a varying number of times), and our forward is the same every step. `accelerate launch
--multi_gpu` starts the same processes through torchrun with the same variables, so this code runs under it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from .data.sampler import SeededSampler
from .lora import is_quantized

STRATEGIES = ("ddp", "fsdp")


def launched() -> bool:
    """True inside a process started by torchrun / accelerate launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class LossModule(nn.Module):
    """The model plus its loss as one forward(): DDP and FSDP hook into forward() to set up the gradient
    all-reduce (DDP) or the parameter all-gather (FSDP). The Trainer's loss calls model.embed, model.decoder and
    model.decoder.lm_head directly, which those hooks would miss."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict, neftune_alpha: float | None = None):
        return self.loss_fn(self.model, batch, neftune_alpha)


@dataclass
class DistContext:
    """Where this process sits among the training processes, and the few collective operations training needs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "ddp"  # ddp | fsdp (used only when world_size > 1)
    find_unused_parameters: bool = False  # every trainable parameter gets a gradient in every step of our recipes
    wrapped: nn.Module | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")

    # -- setup --------------------------------------------------------------------------------

    @classmethod
    def from_env(cls, strategy: str = "ddp") -> DistContext:
        """Join the process group torchrun prepared (idempotent); one process when not launched."""
        if not launched():
            return cls(strategy=strategy)
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            # Before any .cuda(): each process drives its own GPU, and NCCL needs to know which.
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            # NCCL between GPUs; gloo on CPUs (this course's tests, and a laptop with several cores).
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, strategy=strategy)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    # -- the model ----------------------------------------------------------------------------

    def place(self, model: nn.Module) -> nn.Module:
        """Under a launcher on GPUs, put the model on this process's GPU (a model built with .cuda() before
        the context existed sits on GPU 0 in every process)."""
        if self.enabled and self.device.type == "cuda":
            model.to(self.device)
        return model

    def wrap(self, model: nn.Module, loss_fn) -> nn.Module:
        """The module the Trainer calls for the loss: model + loss_fn, in DDP or FSDP when distributed.

        Call after the recipe (freezing, LoRA, 4-bit) and before building the optimiser (FSDP replaces the
        parameters by shards).
        """
        module = LossModule(model, loss_fn)
        if not self.enabled:
            self.wrapped = module
            return module
        self.check_same_model(model)
        if self.strategy == "fsdp":
            self.wrapped = shard_fsdp(module)
            return self.wrapped
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [self.local_rank] if self.device.type == "cuda" else None
        # No buffer sync before each forward: the only buffers (RoPE frequencies) are constants. The option
        # was renamed in torch 2.13 (forward_sync_buffers); older versions call it broadcast_buffers.
        renamed = "forward_sync_buffers" in inspect.signature(DDP).parameters
        no_buffer_sync = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
        self.wrapped = DDP(module, device_ids=device_ids, find_unused_parameters=self.find_unused_parameters,
                           **no_buffer_sync)
        return self.wrapped

    def check_same_model(self, model: nn.Module) -> None:
        """Every process must have built the same weights: DDP copies rank 0's parameters at wrap time, but
        not what bitsandbytes keeps beside them (NF4 block scales), so a mismatch would train silently wrong."""
        local = torch.tensor([float(p.detach().double().sum()) for p in model.parameters()] or [0.0],
                             dtype=torch.float64, device=self.device)
        everyone = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(everyone, local)
        if not all(torch.equal(everyone[0], other) for other in everyone[1:]):
            raise RuntimeError("the processes built different models: seed every process the same way "
                               "(training.set_seed(cfg.seed)) before building the model, and load the same weights")

    def no_sync(self, sync: bool):
        """Skip the gradient all-reduce for all but the last micro-batch of an accumulated step."""
        if sync or not self.enabled:
            return contextlib.nullcontext()
        if self.strategy == "fsdp":
            return _fsdp_no_sync(self.wrapped)
        return self.wrapped.no_sync()

    def unsharded(self):
        """Full parameters for code that calls the model outside the wrapped forward (evaluation)."""
        if self.enabled and self.strategy == "fsdp":
            return _fsdp_unsharded(self.wrapped)
        return contextlib.nullcontext()

    # -- collectives --------------------------------------------------------------------------

    def sum(self, *values: float) -> list[float]:
        """Add numbers over all processes (for the token count and the logged loss)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def reseed(self, seed: int, step: int) -> None:
        """Per-process randomness (LoRA dropout, NEFTune) from (seed, step, rank): each process draws different
        noise, and a resumed run draws the same noise as an uninterrupted one without saving every process's RNG."""
        if self.enabled:
            key = hashlib.blake2b(f"{seed}/{step}/{self.rank}".encode(), digest_size=8).digest()
            torch.manual_seed(int.from_bytes(key, "big") % 2**63)

    # -- data ---------------------------------------------------------------------------------

    def row_source(self, rows, seed: int):
        """This process's rows: a seeded shard of a list, or a stream already split by the loader."""
        if hasattr(rows, "__len__") and hasattr(rows, "__getitem__"):
            return ShardedRows(rows, SeededSampler(len(rows), seed), self.rank, self.world_size)
        return StreamRows(rows, self.rank, self.world_size)

    # -- checkpoints --------------------------------------------------------------------------

    def checkpoint_state(self, model: nn.Module, optimizer) -> tuple[dict, dict] | None:
        """(trainable weights, optimiser state) in the one-process checkpoint format, or None to let the
        Trainer read them itself. Collective under FSDP: every process must call it."""
        if not (self.enabled and self.strategy == "fsdp"):
            return None
        return fsdp_full_state(self.wrapped, optimizer)

    def load_checkpoint_state(self, weights: dict, optimizer_state: dict | None, optimizer) -> bool:
        """Load full (unsharded) checkpoint tensors into FSDP shards; False when not under FSDP."""
        if not (self.enabled and self.strategy == "fsdp"):
            return False
        fsdp_load_full_state(self.wrapped, optimizer, weights, optimizer_state)
        return True

    def full_model(self, trainer, apply_recipe) -> nn.Module | None:
        """The trained model with full weights on rank 0 (for merging and export), None on the others.
        Collective under FSDP: the shards are gathered into a fresh copy with the same recipe (LoRA layers)."""
        if not (self.enabled and self.strategy == "fsdp"):
            return trainer.model if self.is_main else None
        state = fsdp_full_model_state(self.wrapped)
        if not self.is_main:
            return None
        copy = type(trainer.model)(trainer.model.config)
        apply_recipe(copy, trainer.cfg)
        copy.load_state_dict(state)
        return copy

    def check_resume(self, saved: dict, cfg) -> None:
        """Resuming with another number of processes works when the global batch is unchanged (the data order
        is global, see ShardedRows); otherwise the run would silently change its batch size, so stop and say how."""
        saved_world = int(saved.get("world_size", 1))
        saved_cfg = saved.get("config", {})
        per_process = lambda c: c.get("batch_size", 0) * c.get("grad_accum_steps", 1)  # noqa: E731
        before = saved_world * per_process(saved_cfg)
        now = self.world_size * cfg.batch_size * cfg.grad_accum_steps
        if before == now:
            return
        hint = suggest_batch(before, self.world_size, cfg.batch_size)
        raise ValueError(
            f"this checkpoint was trained with a global batch of {before} rows per step ({saved_world} process(es) x "
            f"batch_size {saved_cfg.get('batch_size')} x grad_accum_steps {saved_cfg.get('grad_accum_steps')}), "
            f"this run has {now} ({self.world_size} x {cfg.batch_size} x {cfg.grad_accum_steps}). Keep the global batch: "
            f"{hint}; or relaunch with {saved_world} processes (torchrun --nproc-per-node {saved_world}), or start a new "
            "run in another --output folder.")


def suggest_batch(global_batch: int, world_size: int, batch_size: int) -> str:
    """How to reach `global_batch` rows per step on `world_size` processes, for an error message."""
    if global_batch % world_size:
        return f"{global_batch} rows do not split over {world_size} processes, use a number of processes dividing it"
    per_process = global_batch // world_size
    if per_process % batch_size == 0:
        return f"use --batch-size {batch_size} --grad-accum-steps {per_process // batch_size}"
    return f"use --batch-size {per_process} --grad-accum-steps 1"


# ----------------------------------------------------------------------------------------------
# Data: every process reads a different slice of each global batch


class ShardedRows:
    """A DistributedSampler-like seeded shard of a list of rows, that resumes with any number of processes.

    All processes walk the same seeded permutation of the whole list (SeededSampler: a new one each epoch) and
    consume it one global batch at a time; process r takes the r-th slice of each. So in an epoch no process
    sees a row that another one saw, no row is dropped or repeated to even out the shards, and the position
    saved in a checkpoint is global: one process with batch_size 2B reads exactly what 2 processes with B read.
    """

    def __init__(self, rows, sampler, rank: int = 0, world_size: int = 1):
        self.rows, self.sampler, self.rank, self.world_size = rows, sampler, rank, world_size

    def take(self, n: int) -> list[int]:
        """Indices of this process's next n rows."""
        global_batch = self.sampler.take(n * self.world_size)
        return global_batch[self.rank * n:(self.rank + 1) * n]

    def next_rows(self, n: int) -> list:
        return [self.rows[i] for i in self.take(n)]

    def state_dict(self) -> dict:
        return dict(self.sampler.state_dict(), world_size=self.world_size)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class StreamRows:
    """Rows from a stream (a streamed the_cauldron split for this process), restarted when it runs out.

    Each process counts the rows it consumed; resuming replays its stream up to that count (a stream has no
    random access; the replay decodes the rows again, so it takes a while after a long run). Each pass calls
    the stream's set_epoch, when it has one, for a new order. The split depends on the number of processes, so resuming with another number stops.
    """

    def __init__(self, stream: Iterable, rank: int = 0, world_size: int = 1):
        split = getattr(stream, "world_size", 1)
        if world_size > 1 and split != world_size:
            raise ValueError(
                f"{world_size} processes would all read the same stream: split it per process with "
                "load_cauldron(..., streaming=True, rank=ctx.rank, world_size=ctx.world_size) "
                "(or pass a list of rows, which the Trainer shards itself)")
        self.stream, self.rank, self.world_size = stream, rank, world_size
        self.consumed, self.epoch, self._iterator = 0, 0, None

    def _start(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.stream, "set_epoch"):  # a new order each pass (CauldronStream, datasets.IterableDataset)
            self.stream.set_epoch(epoch)
        self._iterator = iter(self.stream)

    def _next(self):
        if self._iterator is None:
            self._start(self.epoch)
        row = next(self._iterator, None)
        if row is None:  # end of this process's epoch: start the next pass
            self._start(self.epoch + 1)
            row = next(self._iterator, None)
            if row is None:
                raise ValueError("the training stream has no rows: check the subsets, data path and split")
        return row

    def next_rows(self, n: int) -> list:
        rows = [self._next() for _ in range(n)]
        self.consumed += n
        return rows

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "epoch": self.epoch, "world_size": self.world_size, "stream": True}

    def load_state_dict(self, state: dict) -> None:
        if not state.get("stream"):
            raise ValueError("this checkpoint was trained on a list of rows, not a stream: resume with the same data")
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"this checkpoint streamed the data split over {state['world_size']} process(es) and this run has "
                f"{self.world_size}: each process's stream position only makes sense for the same split. Relaunch "
                f"with torchrun --nproc-per-node {state['world_size']} (in total), or start a new run.")
        self._iterator, self.consumed, self.epoch = None, 0, 0
        for _ in range(state["consumed"]):  # replay: deterministic for the seed, rank and world size
            self._next()
        self.consumed = state["consumed"]


# ----------------------------------------------------------------------------------------------
# FSDP (sharded parameters) for decoders that do not fit on one device


def shard_fsdp(module: LossModule) -> nn.Module:
    """FSDP2: one shard group per transformer block, the rest (embeddings, norms, projector) in the root.

    Each process keeps 1/N of every parameter, its gradient and its Adam moments; a block's full weights are
    all-gathered just before its forward (and backward) and freed right after. Works with full fine-tuning and
    LoRA on float weights; a 4-bit base (QLoRA) is already small, use DDP for it.
    """
    from torch.distributed.fsdp import fully_shard

    if is_quantized(module.model):
        raise ValueError("FSDP with a 4-bit (QLoRA) base is not supported here: bitsandbytes keeps the NF4 scales "
                         "beside the weights, which FSDP would not shard. Use strategy='ddp' for qlora (the 4-bit "
                         "base is ~4x smaller already), or decoder='lora' with FSDP.")
    model = module.model
    for block in [*model.vision.layers, *model.decoder.layers]:
        fully_shard(block)
    return fully_shard(module)


@contextlib.contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


@contextlib.contextmanager
def _fsdp_unsharded(module):
    # The blocks gather their own weights in their forward hooks; the root's (embeddings, projector, ...) are
    # gathered here because evaluation calls model.embed / model.decoder, not the root's forward.
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def _strip(name: str) -> str:
    return name.removeprefix("model.")


def fsdp_full_state(module, optimizer) -> tuple[dict, dict]:
    """Gather the trainable weights and the optimiser state to rank 0 (CPU), in the one-process format:
    weights by parameter name, optimiser state by parameter index (so any strategy can resume the checkpoint)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(module, optimizer, options=options)
    trainable = {_strip(n) for n, p in module.named_parameters() if p.requires_grad}
    weights = {_strip(n): t.contiguous() for n, t in model_state.items() if _strip(n) in trainable}
    if not optim_state:  # not rank 0
        return weights, {}
    index, groups = {}, []
    for group in optim_state["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append(dict(group, params=ids))
    state = {index[name]: value for name, value in optim_state["state"].items()}
    return weights, {"state": state, "param_groups": groups}


def fsdp_load_full_state(module, optimizer, weights: dict, optimizer_state: dict | None) -> None:
    """Inverse of fsdp_full_state: every process passes the full tensors it read, each keeps its own shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(module, {f"model.{n}": t for n, t in weights.items()}, options=options)
    if optimizer_state is None:
        return
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    by_id = {id(p): n for n, p in module.named_parameters()}
    ordered = [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]
    if len(ordered) != len(names):
        raise ValueError("the optimiser's parameters differ from the model's trainable ones")
    state = {ordered[i]: value for i, value in optimizer_state["state"].items()}
    groups = [dict(g, params=[ordered[i] for i in g["params"]]) for g in optimizer_state["param_groups"]]
    set_optimizer_state_dict(module, optimizer, {"state": state, "param_groups": groups}, options=options)


def fsdp_full_model_state(module) -> dict:
    """Every weight of the model, unsharded, on rank 0's CPU (empty on the others). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {_strip(n): t for n, t in state.items()}
