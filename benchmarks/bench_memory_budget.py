"""Memory budget: the estimate vs the measured peak memory of our models on this CPU, in one run.

    python benchmarks/bench_memory_budget.py [--cases tiny,smol,smol-batch8]

Each case runs in a fresh Python process, so earlier cases leave nothing behind:
  1. import torch and vlm_course, build the processor: the resident memory now is the runtime overhead;
  2. load the model (for `smol`: the course ViT + the real SmolLM2-135M-Instruct, fp32);
  3. reset the kernel's peak counter (/proc/self/clear_refs), generate greedily, read the peak (VmHWM).
The estimate (`vlm_course.deploy.budget.estimate_memory`, fp32 weights and KV cache, prefill of the whole
prompt) uses the overhead measured in step 1. Printed: estimate, measured peak, relative error, and the
same for the model's own part (peak minus overhead), which is what the estimate actually models.
Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLM_COURSE_OFFLINE", "1")

CASES = {  # name: (profile, batch, new tokens)
    "tiny": ("tiny", 1, 32),
    "tiny-batch8": ("tiny", 8, 64),
    "smol": ("smol", 1, 32),
    "smol-batch8": ("smol", 8, 64),
}


def proc_status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS: resident now, VmHWM: peak since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status: this benchmark needs Linux")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # "5" resets the peak RSS (VmHWM) to the current RSS


def child(case: str) -> dict:
    """Runs in a fresh process: measure overhead, load, reset the peak, generate, read the peak."""
    import torch
    from PIL import Image

    from vlm_course.deploy.budget import estimate_memory
    from vlm_course.processing import VLMProcessor
    from vlm_course.vlm import VisionLanguageModel

    profile, batch, new_tokens = CASES[case]
    from vlm_course.config import get_profile

    processor = VLMProcessor.from_config(get_profile(profile).config)
    overhead = proc_status("VmRSS")
    model = VisionLanguageModel.from_profile(profile).eval()
    processor = VLMProcessor(processor.tokenizer, model.config)  # same tokenizer: no second copy in memory
    after_load = proc_status("VmRSS")
    images = [Image.new("RGB", (64, 64), (40 * i % 255, 90, 160)) for i in range(batch)]
    questions = [f"Describe the picture number {i} in detail, please." for i in range(batch)]
    inputs = processor(images, questions)
    prompt_tokens = inputs["input_ids"].shape[1]
    reset_peak()
    with torch.no_grad():
        model.generate(
            inputs["input_ids"],
            inputs["pixel_values"],
            inputs["attention_mask"],
            max_new_tokens=new_tokens,
            eos_token_id=None,
        )
    peak = proc_status("VmHWM")
    budget = estimate_memory(
        model.config,
        weights="fp32",
        kv_bits="fp32",
        context_length=prompt_tokens + new_tokens,
        batch=batch,
        runtime_overhead=overhead,
        prefill_tokens=prompt_tokens,
    )
    return {
        "case": case,
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "overhead": overhead,
        "after_load": after_load,
        "peak": peak,
        "estimate": budget.total,
        "weights": budget.weight_bytes,
        "kv": budget.kv_cache,
        "activations": budget.activations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {list(CASES)}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    mb = 2**20
    print(
        f"{'case':12s} {'prompt+new':>10s} {'weights':>8s} {'KV':>7s} {'activ.':>7s} {'overhead':>8s} "
        f"{'estimate':>8s} {'measured':>8s} {'error':>7s} | "
        f"{'model est.':>10s} {'model meas.':>11s} {'error':>7s}"
        f" | {'loaded':>7s}"
    )
    for case in args.cases.split(","):
        if case not in CASES:
            raise SystemExit(f"unknown case {case!r}: choose from {list(CASES)}")
        out = subprocess.run([sys.executable, __file__, "--child", case], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"case {case} failed:\n{out.stderr[-2000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        error = r["estimate"] / r["peak"] - 1
        model_est, model_meas = r["estimate"] - r["overhead"], r["peak"] - r["overhead"]
        print(
            f"{case:12s} {r['prompt_tokens']:>5d}+{r['new_tokens']:<4d} "
            f"{r['weights'] / mb:8.1f} {r['kv'] / mb:7.1f} "
            f"{r['activations'] / mb:7.1f} {r['overhead'] / mb:8.1f} "
            f"{r['estimate'] / mb:8.1f} {r['peak'] / mb:8.1f} "
            f"{error:+7.1%} | {model_est / mb:10.1f} {model_meas / mb:11.1f} "
            f"{model_est / model_meas - 1:+7.1%}"
            f" | {(r['after_load'] - r['overhead']) / mb:7.1f}"
        )
    print(
        "\nMB = 2^20 bytes. measured = peak resident memory while generating (VmHWM after a reset). "
        "error = estimate / measured - 1; 'model' columns leave out the measured runtime overhead; "
        "'loaded' = resident memory added by loading the model, before generating."
    )


if __name__ == "__main__":
    main()
