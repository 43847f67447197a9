#!/usr/bin/env python3
"""Latency, tokens/s and peak memory of this bundle on this machine.

    python benchmark.py                          # CPU, fp32, a synthetic image
    python benchmark.py --provider cuda --int8 --new-tokens 64 --runs 5

Reports per run: image encoding, prefill (time to first token), decode tokens/s (new tokens after the
first / decode time; generation ignores <|im_end|> so every run decodes the same number of tokens), and
the process's peak resident memory. The first run warms up (graph optimisation, allocator) and is not
counted. Compare decode tokens/s with the roofline in README.md: bandwidth / bytes read per token.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import PROVIDERS, BundleError, VLMRunner  # noqa: E402 (run.py sits next to this file)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far.

    Linux: VmHWM from /proc (ru_maxrss would also count the parent's memory when we were started by fork +
    exec, e.g. from a notebook). Elsewhere ru_maxrss (macOS reports bytes).
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def measure_bandwidth(size_mb: int = 256, repeats: int = 3) -> float:
    """CPU memory bandwidth in bytes/s: a numpy copy of 256 MB, counted as read + write (best of 3)."""
    src = np.ones(size_mb * 2**20 // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def synthetic_image(size: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (240, 240, 240))
    draw = ImageDraw.Draw(image)
    draw.ellipse((size // 8, size // 8, size // 2, size // 2), fill=(220, 30, 30))
    draw.rectangle((size // 2, size // 2, size - size // 8, size - size // 8), fill=(30, 30, 220))
    return image


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", help="an image file (default: a synthetic picture)")
    parser.add_argument("--question", default="What shapes are in the image?")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--provider", default="cpu", choices=sorted(PROVIDERS))
    parser.add_argument("--int8", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument(
        "--bandwidth-gbs",
        type=float,
        default=None,
        help="memory bandwidth for the roofline (default: measured with a numpy copy; on a Jetson "
        "the GPU sees up to 68 GB/s, 102 in Super mode)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        runner = VLMRunner(
            Path(__file__).resolve().parent,
            provider=args.provider,
            int8=args.int8,
            check_hashes=False,
            threads=args.threads,
        )
    except BundleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - start
    image = args.image or synthetic_image(runner.config["image_size"])
    runs = []
    for i in range(args.runs + 1):
        timings = {}
        runner.generate_ids(image, args.question, args.new_tokens, ignore_eos=True, timings=timings)
        if i > 0:  # run 0 warms up
            runs.append(timings)
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    decoded = median["new_tokens"] - 1  # the first new token comes out of the prefill
    result = {
        "provider": args.provider,
        "int8": args.int8,
        "load_s": load_s,
        "prompt_tokens": median["prompt_tokens"],
        "new_tokens": median["new_tokens"],
        "image_encode_ms": 1e3 * median["image_encode"],
        "prefill_ms": 1e3 * median["prefill"],
        "decode_tokens_per_s": decoded / median["decode"] if decoded > 0 else float("nan"),
        "total_ms": 1e3 * (median["image_encode"] + median["prefill"] + median["decode"]),
        "peak_rss_mb": peak_rss_mb(),
    }
    # Roofline: a decode step reads every decoder weight once plus the KV cache so far (README.md).
    c = runner.config
    bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else measure_bandwidth()
    context = median["prompt_tokens"] + median["new_tokens"] / 2  # average cache length while decoding
    step_bytes = c["decode_weight_bytes"]["int8" if args.int8 else "fp32"] + c["kv_bytes_per_token"] * context
    result.update(bandwidth_gb_s=bandwidth / 1e9, roofline_tokens_per_s=bandwidth / step_bytes)
    result["measured_over_roofline"] = result["decode_tokens_per_s"] / result["roofline_tokens_per_s"]
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"bundle {runner.folder.name}: provider {args.provider}, {'int8' if args.int8 else 'fp32'}, "
        f"median of {args.runs} runs after one warm-up"
    )
    print(f"  load              {result['load_s']:8.2f} s")
    print(f"  image encode      {result['image_encode_ms']:8.1f} ms")
    print(f"  prefill           {result['prefill_ms']:8.1f} ms  ({result['prompt_tokens']} prompt tokens)")
    print(
        f"  decode            {result['decode_tokens_per_s']:8.1f} tokens/s  "
        f"({result['new_tokens']} new tokens)"
    )
    print(f"  total latency     {result['total_ms']:8.1f} ms")
    print(f"  peak memory (RSS) {result['peak_rss_mb']:8.1f} MB")
    print(
        f"  decode roofline   {result['roofline_tokens_per_s']:8.1f} tokens/s "
        f"at {result['bandwidth_gb_s']:.1f} GB/s "
        f"({step_bytes / 2**20:.0f} MB per token): measured is {result['measured_over_roofline']:.0%} of it"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
