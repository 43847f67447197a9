"""QLoRA vs fp32 LoRA on the real SmolLM2-135M-Instruct: peak memory and step time, side by side in one run.

    python benchmarks/bench_qlora.py [--batch 4 --seq 192 --steps 3 --rank 8 --configs lora-fp32,qlora-fp32,...]

Configs (LoRA r=8, alpha=16 on q,k,v,o,gate,up,down; embeddings and the tied lm_head stay fp32 and frozen):
    lora-fp32    fp32 base weights, fp32 compute                     (the reference)
    qlora-fp32   NF4 base (bitsandbytes Linear4bit, double quant), dequantised to fp32 for each matmul
    qlora-bf16   NF4 base, bf16 compute under torch.autocast (the demo's set-up)
    lora-bf16    fp32 base, bf16 autocast

One training step = forward on (batch, seq) random token ids, next-token cross-entropy on every position,
backward, AdamW step on the adapters. Each config runs in a fresh process, one after the other:
  1. import everything; resident memory now = runtime overhead (torch, bitsandbytes, peft)
  2. load SmolLM2 (fp32), quantise / add LoRA, free what the conversion left behind
  3. model memory = RSS now - overhead; also the exact bytes of its tensors (parameters, buffers, NF4 states)
  4. reset the kernel's peak-RSS counter (/proc/self/clear_refs), run the steps, read the peak (VmHWM)
  5. peak training memory = VmHWM - overhead (model + activations + gradients + optimiser state)
Memory is measured as process RSS from /proc (not tracemalloc: torch allocates outside Python's allocator).
Step time is the median of --steps timed steps after one warm-up step (CPU seconds with --threads 1, so other
jobs on a shared machine do not distort it; wall-clock otherwise). Linux only. The first run converts the
offline GGUF once (~25 s).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLM_COURSE_OFFLINE", "1")

CONFIGS = {  # name: (4-bit base, autocast dtype name or None)
    "lora-fp32": (False, None),
    "qlora-fp32": (True, None),
    "qlora-bf16": (True, "bfloat16"),
    "lora-bf16": (False, "bfloat16"),
}
MB = 2**20


def proc_status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS: resident now, VmHWM: peak since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status: this benchmark needs Linux")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def release_freed_memory() -> None:
    """Return freed heap pages to the OS, so RSS reflects what is alive (glibc keeps small frees cached)."""
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def tensor_bytes(module) -> int:
    """Bytes of every parameter and buffer, plus the NF4 quantisation states (absmax, nested scales, codebook)."""
    import bitsandbytes as bnb

    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    for m in module.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            state = m.weight.quant_state
            parts = [state.absmax, state.code] + ([state.state2.absmax, state.state2.code] if state.nested else [])
            total += sum(p.numel() * p.element_size() for p in parts)
    return total


def child(name: str, batch: int, seq: int, steps: int, rank: int) -> dict:
    import torch
    import torch.nn.functional as F

    from vlm_course.training import TrainConfig, add_lora, quantize_4bit
    from vlm_course.weights import load_smollm2

    four_bit, amp = CONFIGS[name]
    amp_dtype = getattr(torch, amp) if amp else None
    overhead = proc_status("VmRSS")

    decoder, _ = load_smollm2()
    cfg = TrainConfig(lora_r=rank, lora_alpha=2 * rank, lora_dropout=0.05)
    decoder.requires_grad_(False)
    if four_bit:
        quantize_4bit(decoder.layers, compute_dtype=amp_dtype or torch.float32, double_quant=True)
    add_lora(decoder, cfg.lora_targets, cfg)
    trainable = [p for n, p in decoder.named_parameters() if "lora_" in n]
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    decoder.train()
    release_freed_memory()
    model_rss = proc_status("VmRSS") - overhead

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, decoder.cfg.vocab_size, (batch, seq), generator=generator)

    # One thread: time CPU seconds of this process (robust to other jobs on a shared machine); else wall-clock.
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter

    def step() -> float:
        start = clock()
        with torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = decoder(input_ids=input_ids).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return clock() - start

    reset_peak()
    step()  # warm-up (also allocates AdamW's state)
    times = [step() for _ in range(steps)]
    peak = proc_status("VmHWM") - overhead
    return {"name": name, "overhead": overhead, "model_rss": model_rss, "model_tensors": tensor_bytes(decoder),
            "peak": peak, "step": statistics.median(times), "trainable": sum(p.numel() for p in trainable)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=192)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.seq, args.steps, args.rank)))
        return 0
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    if "lora-fp32" not in names:
        names.insert(0, "lora-fp32")  # the reference for the ratios

    print(f"SmolLM2-135M-Instruct, LoRA r={args.rank} on q,k,v,o,gate,up,down; batch {args.batch} x {args.seq} "
          f"tokens; {torch.get_num_threads()} threads; median of {args.steps} steps after a warm-up")
    results = {}
    for name in names:
        command = [sys.executable, __file__, "--child", name, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--steps", str(args.steps), "--rank", str(args.rank)]
        command += ["--threads", str(args.threads)] if args.threads else []
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            return 1
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    ref = results["lora-fp32"]
    print(f"{'config':<11} {'model tensors':>13} {'model RSS':>10} {'peak train':>11} {'step':>7}   "
          f"ratios vs lora-fp32: tensors / peak / step time")
    for name, r in results.items():
        print(f"{name:<11} {r['model_tensors'] / MB:>10.0f} MB {r['model_rss'] / MB:>7.0f} MB {r['peak'] / MB:>8.0f} MB "
              f"{r['step']:>6.2f}s   {r['model_tensors'] / ref['model_tensors']:.2f} / {r['peak'] / ref['peak']:.2f} "
              f"/ {r['step'] / ref['step']:.2f}")
    print(f"(runtime overhead before loading, subtracted above: ~{ref['overhead'] / MB:.0f} MB; "
          f"trainable LoRA parameters: {ref['trainable']:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
