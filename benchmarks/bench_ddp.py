"""Data-parallel training on this machine: 2 processes (torchrun + DDP, gloo) vs 1, samples/s side by side.

    python benchmarks/bench_ddp.py [--profile tiny --decoder full --batch-size 8 --steps 8]

Three runs of the unchanged Trainer, each started by torchrun (the real launcher), one after the other:

    1 process  x 1 thread    the baseline for scaling: ideal data parallelism doubles it
    1 process  x 2 threads   what one process gets from both cores (intra-op threads)
    2 processes x 1 thread   DDP: each process a batch of --batch-size, gradients all-reduced over gloo

Throughput = rows trained per second of wall time over the timed steps (after --warmup steps), counted over all
processes; each run is repeated --repeats times (the runs interleaved) and the best is kept, as the machine's
load changes from minute to minute. Printed: the two ratios (2 procs vs 1 proc x 1 thread = scaling efficiency x 2; 2 procs vs 1 proc x 2
threads = is DDP a better use of the cores than threads).

CAVEAT: the 2 CPU cores of this machine are shared (other jobs, and here with each other): the load average is
printed with the result, and the ratios say little about GPUs, where each process has its own device and the
all-reduce runs over NVLink / InfiniBand (NCCL) while the next layer's backward computes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("VLM_COURSE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RUNS = (("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2), ("2 processes x 1 thread", 2, 1))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="tiny")
    p.add_argument("--vision", default="full")
    p.add_argument("--decoder", default="full", help="frozen | lora | qlora | full")
    p.add_argument("--batch-size", type=int, default=8, help="rows per process per step")
    p.add_argument("--steps", type=int, default=8, help="timed optimiser steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocations, gloo connections)")
    p.add_argument("--repeats", type=int, default=2, help="runs per configuration; the best is reported")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # set when started by torchrun
    return p.parse_args(argv)


def worker(args) -> None:
    """One process of a run: train warmup + steps, time the steps; rank 0 writes the result."""
    import torch

    from vlm_course.data.cauldron import load_mini_cauldron
    from vlm_course.distributed import DistContext
    from vlm_course.processing import VLMProcessor
    from vlm_course.training import TrainConfig, Trainer, set_seed
    from vlm_course.vlm import VisionLanguageModel

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    ctx = DistContext.from_env()
    set_seed(0)
    model = VisionLanguageModel.from_profile(args.profile)
    processor = VLMProcessor.from_config(model.config, system_prompt=None)
    rows = load_mini_cauldron("train", subsets=["shapes", "count"], max_per_subset=64, verbose=False)
    cfg = TrainConfig(vision=args.vision, decoder=args.decoder, batch_size=args.batch_size, precision="fp32",
                      max_steps=args.warmup + args.steps, warmup_fraction=0.0, progress=False,
                      output_dir=tempfile.mkdtemp(prefix="bench-ddp-"))
    trainer = Trainer(model, processor, rows, cfg, distributed=ctx)
    for _ in range(args.warmup):
        trainer.train_step()
    ctx.barrier()
    start = time.perf_counter()
    tokens = sum(trainer.train_step()["tokens"] for _ in range(args.steps))  # all-reduced: every process
    ctx.barrier()
    seconds = time.perf_counter() - start
    if ctx.is_main:
        rows_done = args.steps * args.batch_size * ctx.world_size
        Path(args.worker).write_text(json.dumps({"seconds": seconds, "rows": rows_done, "tokens": tokens}))
    ctx.close()


def launch(args, processes: int, threads: int) -> dict:
    """Start this script under torchrun and read rank 0's result."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               __file__, "--worker", str(result), "--profile", args.profile, "--vision", args.vision,
               "--decoder", args.decoder, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"run with {processes} process(es) failed:\n{done.stderr[-4000:]}")
        return json.loads(result.read_text())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    load_before = os.getloadavg()[0]
    print(f"profile {args.profile}, vision {args.vision}, decoder {args.decoder}, fp32, batch {args.batch_size} "
          f"rows per process, {args.steps} timed steps after {args.warmup}; {os.cpu_count()} CPU cores")
    results = {}
    for round_ in range(args.repeats):
        for name, processes, threads in RUNS:
            r = launch(args, processes, threads)
            speed = r["rows"] / r["seconds"]
            results[name] = max(results.get(name, 0.0), speed)
            print(f"  [{round_ + 1}/{args.repeats}] {name:<24} {speed:8.1f} samples/s  ({r['rows']} rows in "
                  f"{r['seconds']:.2f} s, {r['tokens'] / r['seconds']:.0f} tokens/s)")
    print("best of each: " + ", ".join(f"{name} {speed:.1f}" for name, speed in results.items()))
    ddp = results["2 processes x 1 thread"]
    print(f"2 processes vs 1 process x 1 thread : {ddp / results['1 process x 1 thread']:.2f}x samples/s "
          "(ideal 2.00 with 2 free cores)")
    print(f"2 processes vs 1 process x 2 threads: {ddp / results['1 process x 2 threads']:.2f}x samples/s")
    if results["1 process x 2 threads"] < results["1 process x 1 thread"]:
        print("note: 2 threads were slower than 1: each op waits for both of its threads (OpenMP), so on busy cores "
              "a descheduled thread stalls the whole process; separate processes do not wait on each other per op.")
    print(f"caveat: the {os.cpu_count()} cores are shared with other jobs (load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after) and, in the 2-process run, with each other: read the ratios as "
          "'DDP runs and overlaps correctly', not as a GPU scaling prediction.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
