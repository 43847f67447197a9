"""Training on several processes: 2 CPU processes with the gloo backend, started by the real launcher (torchrun).

One torchrun launch (module fixture `two_process_run`) runs this file as a worker script in 2 processes; each
scenario below trains the `tiny` profile for a few steps with the unchanged Trainer and saves what it saw
(per-step losses, the synchronised gradients of step 1, the row indices it read, its writes, checkpoints).
The tests then compare those with ONE process on the combined batch, in the pytest process:

    ddp    full fine-tuning of every component, fp32: gradients equal to one process with batch 2 x 2
           (tolerance atol 1e-6, rtol 1e-5: the same sums in a different order); per-step losses rel 1e-5;
           disjoint rows; only rank 0 writes; the checkpoint resumes in 1 process (same global batch) or stops
           with a clear error (another global batch).
    qlora  NF4 base + LoRA under DDP: the LoRA gradients match one process, the 4-bit weights stay identical.
    fsdp   strategy="fsdp" (FSDP2 fully_shard, gloo): gradients match one process; its checkpoint (gathered
           to full tensors) resumes in 1 process; evaluation runs on the sharded model.
    resume the step-2 checkpoints of ddp and fsdp, resumed in 2 processes: the same losses as without a stop.
    cli    `python -m vlm_course train --streaming --strategy fsdp` on a local copy of the mini-cauldron: each
           process streams its own split of the data (split_dataset_by_node), rank 0 alone writes the curve and
           the merged model (gathered from the FSDP shards).

Everything is small (tiny model, 16 in-memory rows, <= 4 steps) to stay quick on 2 shared cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
BATCH = 2  # rows per process per step; 2 processes -> a global batch of 4
STEPS = 4  # 4 steps x 4 rows = one epoch of the 16 rows
GRAD_TOL = dict(atol=1e-6, rtol=1e-5)  # fp32; the same sums in another order (as the grad-accumulation test)


def make_rows():
    """16 rows: solid-colour images, their colour as the answer (one phrasing per row, some with 2 turns)."""
    out = []
    for k in range(4):
        for i, (name, rgb) in enumerate(COLOURS.items()):
            turns = [{"user": f"What colour is image {k}?", "assistant": name, "source": "test"}]
            if (i + k) % 2:
                turns.append({"user": "Is it bright?", "assistant": "yes" if name == "yellow" else "no", "source": "t"})
            out.append({"images": [Image.new("RGB", (64, 64), rgb)], "texts": turns})
    return out


def tiny_model():
    from vlm_course.training import set_seed
    from vlm_course.vlm import VisionLanguageModel

    set_seed(0)  # every process builds the same random-init weights
    return VisionLanguageModel.from_profile("tiny")


def processor():
    from vlm_course.config import get_profile
    from vlm_course.processing import VLMProcessor

    return VLMProcessor.from_config(get_profile("tiny").config, system_prompt=None)


SCENARIOS = {
    "ddp": dict(vision="full", projector="full", decoder="full", max_grad_norm=None),
    "qlora": dict(decoder="qlora", lora_dropout=0.0, lr_lora=1e-2),
    "fsdp": dict(vision="full", decoder="lora", lora_dropout=0.0, lr_lora=1e-2, strategy="fsdp"),
}


def config(output_dir, scenario, **kw):
    from vlm_course.training import TrainConfig

    defaults = dict(output_dir=str(output_dir), batch_size=BATCH, max_steps=STEPS, save_every=2, keep_checkpoints=2,
                    precision="fp32", progress=False, warmup_fraction=0.0, seed=0)
    return TrainConfig(**{**defaults, **SCENARIOS[scenario], **kw})


def record_grads(trainer):
    """Keep the (synchronised) gradients of the first optimiser step, as full tensors (FSDP holds shards)."""
    grads = {}

    def before_step(optimizer, args, kwargs):
        if not grads:
            for name, p in trainer.model.named_parameters():
                if p.grad is not None:
                    g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                    grads[name] = g.detach().clone()

    trainer.optimizer.register_step_pre_hook(before_step)
    return grads


def row_id(row) -> str:
    return hashlib.blake2b(row["images"][0].tobytes(), digest_size=8).hexdigest()


def record_indices(trainer):
    taken, take = [], trainer.sampler.take

    def take_and_record(n):
        indices = take(n)
        taken.append(indices)
        return indices

    trainer.sampler.take = take_and_record
    return taken


# -------------------------------------------------------------------------------------------------------------
# the worker: `torchrun --nproc-per-node 2 tests/test_distributed.py OUT DATA_DIR`


def worker(out: Path, data_dir: Path) -> None:
    import torch.distributed as dist

    from vlm_course import training
    from vlm_course.distributed import DistContext
    from vlm_course.training import trainer as trainer_module

    rank = int(os.environ["RANK"])
    writes = []  # what this process wrote: only rank 0 may write
    save_checkpoint, write_curve = trainer_module.save_checkpoint, training.Trainer.write_curve
    trainer_module.save_checkpoint = lambda *a, **k: writes.append("checkpoint") or save_checkpoint(*a, **k)
    training.Trainer.write_curve = lambda self: writes.append("curve") or write_curve(self)

    rows, proc = make_rows(), processor()
    for scenario in SCENARIOS:
        # FSDP also evaluates: the eval loop calls the model outside the sharded forward.
        eval_fn = training.make_loss_eval(training.VLMCollator(proc), rows[:4]) if scenario == "fsdp" else None
        trainer = training.Trainer(tiny_model(), proc, rows, config(out / scenario, scenario), eval_fn=eval_fn)
        grads, indices = record_grads(trainer), record_indices(trainer)
        history = trainer.fit()
        # After the run every replica must hold the same weights (DDP) - under FSDP, the gathered ones.
        final = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                 for n, p in trainer.model.named_parameters()}
        torch.save({"losses": [r["loss"] for r in history["train"]], "grads": grads, "indices": indices,
                    "final": final, "evals": history["eval"], "world_size": trainer.dist.world_size},
                   out / f"{scenario}-rank{rank}.pt")
        dist.barrier()

    # Resume each 2-process checkpoint of step 2 in 2 processes again (FSDP: full tensors back into shards).
    for scenario in ("ddp", "fsdp"):
        trainer = training.Trainer(tiny_model(), proc, rows, config(out / f"resume-{scenario}", scenario))
        trainer.resume(out / scenario / "checkpoint-000002")
        losses = [r["loss"] for r in trainer.fit()["train"]]
        torch.save({"losses": losses}, out / f"resume-{scenario}-rank{rank}.pt")

    # The CLI, streaming its own split of a local the_cauldron-style folder in each process.
    quick_streams()
    cli_out = out / "cli"
    argv = ["--profile", "tiny", "--data", str(data_dir), "--subsets", "shapes,count", "--streaming", "--strategy", "fsdp",
            "--max-per-subset", "24", "--batch-size", "2", "--max-steps", "3", "--eval-rows", "0",
            "--precision", "fp32", "--output", str(cli_out)]
    seen, row_source = [], DistContext.row_source

    def row_source_and_record(self, rows, seed):  # record the ids of the rows this process trains on
        source = row_source(self, rows, seed)
        next_rows = source.next_rows
        source.next_rows = lambda n: [seen.append(row_id(r)) or r for r in next_rows(n)]
        return source

    DistContext.row_source = row_source_and_record
    training.train_main(argv)
    (out / f"cli-rank{rank}.json").write_text(json.dumps({"seen": seen, "writes": writes}))



# -------------------------------------------------------------------------------------------------------------
# fixtures


def write_local_cauldron(root: Path) -> Path:
    """A the_cauldron-style folder from the committed mini-cauldron: `shapes` in 2 parquet shards (split by
    whole shards across 2 processes), `count` in 1 (split row by row)."""
    import pyarrow.parquet as pq

    from vlm_course.data.cauldron import assets_dir

    for subset, n, shards in (("shapes", 48, 2), ("count", 30, 1)):
        table = pq.read_table(assets_dir() / "mini_cauldron" / subset / "test.parquet").slice(0, n)
        (root / subset).mkdir(parents=True, exist_ok=True)
        size = n // shards
        for i in range(shards):
            pq.write_table(table.slice(i * size, size), root / subset / f"train-{i:05d}-of-{shards:05d}.parquet")
    return root


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """One torchrun launch of this file in 2 processes (gloo); returns its output folder."""
    root = tmp_path_factory.mktemp("ddp")
    data_dir = write_local_cauldron(root / "data")
    out = root / "out"
    out.mkdir()
    # --standalone: a free local port for the rendezvous (several test runs may share the machine).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
           str(out), str(data_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.fail(f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return out


def quick_streams(monkeypatch=None):
    """datasets waits 5 s after each pass over a streamed parquet file (a workaround for an arrow shutdown
    issue with live reader threads); our passes end normally, and the tests make dozens of them."""
    import datasets

    if monkeypatch is None:
        datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    else:
        monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def load_run(out: Path, scenario: str) -> tuple[dict, dict]:
    return tuple(torch.load(out / f"{scenario}-rank{r}.pt", weights_only=True) for r in (0, 1))


def one_process(tmp_path, scenario, **kw):
    """The same recipe in this (single) process, reading each global batch whole."""
    from vlm_course.training import Trainer

    cfg = config(tmp_path / f"single-{scenario}", scenario, **{"batch_size": 2 * BATCH, "strategy": "ddp", **kw})
    trainer = Trainer(tiny_model(), processor(), make_rows(), cfg)
    assert not trainer.dist.enabled
    return trainer


# -------------------------------------------------------------------------------------------------------------
# 2 processes vs 1


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_processes_stay_identical_replicas(two_process_run, scenario):
    """The gradient all-reduce leaves every process with the same gradient, so the same weights after every
    step (FSDP: the same gathered weights); the logged loss is all-reduced, so the same everywhere too."""
    rank0, rank1 = load_run(two_process_run, scenario)
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["losses"] == rank1["losses"] and len(rank0["losses"]) == STEPS
    assert rank0["grads"].keys() == rank1["grads"].keys() and rank0["grads"]
    for name in rank0["grads"]:
        assert torch.equal(rank0["grads"][name], rank1["grads"][name]), name
    for name in rank0["final"]:
        assert torch.equal(rank0["final"][name], rank1["final"][name]), name


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_synchronised_gradients_match_one_process_on_the_combined_batch(two_process_run, tmp_path, scenario):
    """fp32, tolerance atol 1e-6 + rtol 1e-5 per gradient element (the same sums in another order), for every
    trainable parameter: full fine-tuning (DDP), QLoRA's adapters over an NF4 base (DDP) and LoRA under FSDP.
    The per-step losses of the whole 4-step run agree to rel 1e-5."""
    rank0, _ = load_run(two_process_run, scenario)
    single = one_process(tmp_path, scenario)
    grads = record_grads(single)
    losses = [r["loss"] for r in single.fit()["train"]]
    assert grads.keys() == rank0["grads"].keys()
    for name, g in grads.items():
        torch.testing.assert_close(rank0["grads"][name], g, **GRAD_TOL, msg=name)
    assert rank0["losses"] == pytest.approx(losses, rel=1e-5)


def test_each_process_reads_its_own_rows(two_process_run):
    """Per step the two processes read disjoint rows; over the 4 steps (one epoch of 16 rows) each row exactly
    once; together exactly the rows of one process's global batch (the same seeded order)."""
    from vlm_course.training import SeededSampler

    rank0, rank1 = load_run(two_process_run, "ddp")
    order = SeededSampler(16, seed=0)
    for a, b in zip(rank0["indices"], rank1["indices"], strict=True):
        assert not set(a) & set(b)
        assert a + b == order.take(2 * BATCH)
    epoch = [i for step in rank0["indices"] + rank1["indices"] for i in step]
    assert sorted(epoch) == list(range(16))


def test_only_rank_0_writes(two_process_run):
    writes = [json.loads((two_process_run / f"cli-rank{r}.json").read_text())["writes"] for r in (0, 1)]
    assert writes[1] == []
    assert writes[0].count("curve") == 6 and "checkpoint" in writes[0]
    cli = two_process_run / "cli"
    assert (cli / "loss_curve.png").exists()
    from vlm_course.vlm import VisionLanguageModel

    merged = VisionLanguageModel.from_pretrained(cli / "model")  # gathered from the FSDP shards, LoRA merged
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert json.loads((cli / "train_config.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in cli.iterdir() if p.name.startswith(".tmp")) == []  # no half-written checkpoint


def test_streamed_cauldron_is_split_between_processes(two_process_run, tmp_path, monkeypatch):
    """The CLI under torchrun with --streaming: each process trains on its own split of the local the_cauldron
    folder (disjoint rows, 3 steps x 2 rows each), all of them rows of that folder."""
    from vlm_course.data.cauldron import load_cauldron

    quick_streams(monkeypatch)
    seen = [json.loads((two_process_run / f"cli-rank{r}.json").read_text())["seen"] for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 6
    assert not set(seen[0]) & set(seen[1])
    everything = {row_id(r) for r in load_cauldron(["shapes", "count"], data_dir=write_local_cauldron(tmp_path),
                                                   verbose=False)}
    assert set(seen[0]) | set(seen[1]) <= everything


# -------------------------------------------------------------------------------------------------------------
# resuming a 2-process checkpoint


@pytest.mark.parametrize("scenario", ["ddp", "fsdp"])
def test_two_process_checkpoint_resumes_in_one_process(two_process_run, tmp_path, scenario):
    """Same global batch (1 process x batch 2 x 2 accumulation steps = 2 x 2): the run continues where the
    2 processes were (weights, optimiser, schedule, data position) and steps 3-4 give their losses (rel 1e-5).
    The FSDP checkpoint holds full tensors (gathered at save), so it loads without FSDP."""
    from vlm_course.training import Trainer

    rank0, _ = load_run(two_process_run, scenario)
    cfg = config(tmp_path / "resumed", scenario, grad_accum_steps=2, strategy="ddp")
    trainer = Trainer(tiny_model(), processor(), make_rows(), cfg)
    assert trainer.resume(two_process_run / scenario / "checkpoint-000002") and trainer.step == 2
    losses = [r["loss"] for r in trainer.fit()["train"]]
    assert losses[:2] == rank0["losses"][:2]  # the history of the first 2 steps came with the checkpoint
    assert losses[2:] == pytest.approx(rank0["losses"][2:], rel=1e-5)
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach(), rank0["final"][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("scenario", ["ddp", "fsdp"])
def test_two_process_checkpoint_resumes_in_two_processes(two_process_run, scenario):
    """Interrupted at step 2 and resumed on 2 processes: steps 3-4 as in the uninterrupted run (rel 1e-6)."""
    rank0, _ = load_run(two_process_run, scenario)
    for rank in (0, 1):
        resumed = torch.load(two_process_run / f"resume-{scenario}-rank{rank}.pt", weights_only=True)["losses"]
        assert resumed[:2] == rank0["losses"][:2]
        assert resumed[2:] == pytest.approx(rank0["losses"][2:], rel=1e-6)


def test_resume_with_another_global_batch_says_what_to_do(two_process_run, tmp_path):
    from vlm_course.training import Trainer

    trainer = Trainer(tiny_model(), processor(), make_rows(), config(tmp_path, "ddp"))  # 1 x 2 x 1 rows per step
    with pytest.raises(ValueError, match=r"global batch of 4 .*2 process.*--grad-accum-steps 2.*--nproc-per-node 2"):
        trainer.resume(two_process_run / "ddp" / "checkpoint-000002")


def test_fsdp_evaluates_on_the_sharded_model(two_process_run):
    rank0, rank1 = load_run(two_process_run, "fsdp")
    assert [e["step"] for e in rank0["evals"]] == [STEPS] and rank0["evals"] == rank1["evals"]
    assert 0 < rank0["evals"][0]["eval_loss"] < 20


# -------------------------------------------------------------------------------------------------------------
# in one process: the data split, the errors


def test_sharded_rows_in_one_process_is_the_seeded_sampler():
    from vlm_course.distributed import ShardedRows
    from vlm_course.training import SeededSampler

    alone, reference = ShardedRows(list(range(10)), SeededSampler(10, seed=3)), SeededSampler(10, seed=3)
    assert [alone.take(4) for _ in range(6)] == [reference.take(4) for _ in range(6)]  # across epoch boundaries


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_rows_split_every_global_batch_and_resume_with_another_world_size(world_size):
    """10 rows, 2 per process per step: every global batch is split without overlap; within an epoch no row
    comes twice; the saved position is global, so 1 process with batch 2 x world_size continues the same order."""
    from vlm_course.distributed import ShardedRows
    from vlm_course.training import SeededSampler

    shards = [ShardedRows(list(range(10)), SeededSampler(10, seed=1), r, world_size) for r in range(world_size)]
    reference = SeededSampler(10, seed=1)
    for _ in range(7):
        parts = [s.take(2) for s in shards]
        assert sum(parts, []) == reference.take(2 * world_size)
    order = SeededSampler(10, seed=1)
    assert sorted(order.order(0)) == list(range(10))
    alone = ShardedRows(list(range(10)), SeededSampler(10, seed=1))
    alone.load_state_dict(shards[0].state_dict())
    assert alone.take(2 * world_size) == reference.take(2 * world_size)


def test_stream_rows_restart_resume_and_refuse_an_unsplit_stream():
    from vlm_course.distributed import StreamRows

    class Stream(list):
        world_size, epoch = 1, 0

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __iter__(self):  # a new order each epoch: reversed in odd ones
            return iter(self[::-1] if self.epoch % 2 else self[:])

    stream = StreamRows(Stream(range(5)))
    assert stream.next_rows(3) + stream.next_rows(3) == [0, 1, 2, 3, 4, 4]  # a new pass, a new order
    again = StreamRows(Stream(range(5)))
    again.load_state_dict(stream.state_dict())
    assert again.next_rows(5) == stream.next_rows(5) == [3, 2, 1, 0, 0]
    with pytest.raises(ValueError, match="split it per process"):
        StreamRows(Stream(range(5)), rank=0, world_size=2)  # every process would read the same rows
    Stream.world_size = 2
    with pytest.raises(ValueError, match="--nproc-per-node 1"):
        StreamRows(Stream(range(5)), rank=0, world_size=2).load_state_dict(stream.state_dict())


@pytest.mark.parametrize("streaming", [True, False])
def test_cauldron_split_by_node_is_disjoint_complete_deterministic_and_keeps_the_mix(tmp_path, monkeypatch,
                                                                                    streaming):
    """`shapes` has 2 parquet shards (one per process), `count` one (every other row per process)."""
    from vlm_course.data.cauldron import load_cauldron

    quick_streams(monkeypatch)

    data_dir = write_local_cauldron(tmp_path)

    def ids(rank, world_size, **kw):
        rows = load_cauldron({"shapes": 3, "count": 1}, data_dir=data_dir, streaming=streaming, seed=7, rank=rank,
                             world_size=world_size, verbose=False, **kw)
        return [(r["source"], row_id(r)) for r in rows]

    everything = ids(0, 1)
    assert len(set(everything)) == len(everything) == 78
    parts = [ids(r, 2) for r in (0, 1)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(everything)
    assert ids(1, 2) == parts[1]  # deterministic for (seed, rank, world_size)
    if streaming:  # another epoch: another order, the same rows
        stream = load_cauldron({"shapes": 3, "count": 1}, data_dir=data_dir, streaming=True, seed=7, rank=1,
                               world_size=2, verbose=False)
        stream.set_epoch(1)
        next_epoch = [(r["source"], row_id(r)) for r in stream]
        assert next_epoch != parts[1] and sorted(next_epoch) == sorted(parts[1])
    for rank in (0, 1):  # the mix, while both subsets last: ~3 shapes rows per count row in each process
        head = [source for source, _ in ids(rank, 2, max_samples=32)]
        assert len(head) == 16 and 0.55 <= head.count("shapes") / 16 <= 0.95, head


@pytest.mark.parametrize("vision,decoder", [("lora", "qlora"), ("frozen", "lora"), ("lora", "frozen"),
                                            ("full", "full")])
def test_every_trainable_parameter_gets_a_gradient_so_ddp_needs_no_unused_parameter_search(tmp_path, vision,
                                                                                          decoder):
    """DDP runs with find_unused_parameters=False (no graph walk each step): that is only right if every
    trainable parameter of every recipe receives a gradient in every step (else DDP waits for it forever)."""
    from vlm_course.training import Trainer

    cfg = config(tmp_path, "ddp", vision=vision, decoder=decoder, max_steps=1)
    trainer = Trainer(tiny_model(), processor(), make_rows(), cfg)
    missing = []
    trainer.optimizer.register_step_pre_hook(lambda *_: missing.extend(
        n for n, p in trainer.model.named_parameters() if p.requires_grad and p.grad is None))
    trainer.train_step()
    assert missing == []


def test_fsdp_refuses_a_4bit_base_with_a_clear_error(tmp_path):
    from vlm_course.distributed import LossModule, shard_fsdp
    from vlm_course.training import answer_loss_sum, apply_recipe

    model = tiny_model()
    apply_recipe(model, config(tmp_path, "qlora"))
    with pytest.raises(ValueError, match="strategy='ddp' for qlora"):
        shard_fsdp(LossModule(model, answer_loss_sum))


def test_strategy_is_checked():
    from vlm_course.training import TrainConfig

    with pytest.raises(ValueError, match="strategy"):
        TrainConfig(strategy="zero3")


if __name__ == "__main__":  # a torchrun worker (see two_process_run); functions above are all defined by now
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
