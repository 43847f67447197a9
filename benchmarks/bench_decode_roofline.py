"""Decode roofline vs measured decode speed of SmolLM2-135M on this CPU, in one run.

    python benchmarks/bench_decode_roofline.py [--prompt-tokens 64] [--new-tokens 64] [--repeats 3]
                                               [--no-onnx]

Roofline: tokens/s <= bandwidth / bytes read per token, where bytes = every decoder weight (the tied
embedding counted once, as the output head) + the KV cache at the average context of the run. The
bandwidth is measured in the same run (torch copy of 256 MB, counted as read + write; and a read-only
sum), before and after the decode measurements, so a background load affects both alike.

Contenders: our Decoder in PyTorch fp32 with its KV cache; the same decoder exported to ONNX and run by
onnxruntime in fp32 and with int8 weights (dynamic: per-tensor activation scales; blockwise: scales per
32 values, 9 bits per weight with the block scales; see vlm_course/deploy/quantize.py).
Ratio = measured / roofline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLM_COURSE_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vlm_course.decoder import KVCache  # noqa: E402
from vlm_course.deploy.budget import (  # noqa: E402
    GB,
    MB,
    ORIN_NANO_8GB,
    ORIN_NANO_SUPER,
    decode_roofline,
    measure_memory_bandwidth,
)


@torch.no_grad()
def torch_decode_step_seconds(decoder, prompt_tokens: int, new_tokens: int) -> list[float]:
    """Seconds of each decode step (one new token with a KV cache), after a prefill."""
    cache = KVCache(len(decoder.layers))
    ids = torch.randint(100, 20000, (1, prompt_tokens))
    logits = decoder(input_ids=ids, kv_cache=cache, logits_to_keep=1).logits
    steps = []
    for _ in range(new_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        logits = decoder(input_ids=token, kv_cache=cache, logits_to_keep=1).logits
        logits[0, -1, 0].item()  # wait for the result
        steps.append(time.perf_counter() - start)
    return steps


def onnx_decode_step_seconds(
    session, embed: np.ndarray, cfg, prompt_tokens: int, new_tokens: int
) -> list[float]:
    from vlm_course.deploy.onnx_export import decoder_input_names

    names = decoder_input_names(cfg.num_layers)
    past = [np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)] * (2 * cfg.num_layers)
    ids = np.random.default_rng(0).integers(100, 20000, prompt_tokens)
    seen, steps = 0, []
    for i in range(new_tokens + 1):
        feeds = dict(
            zip(
                names,
                [
                    embed[ids][None],
                    np.ones((1, seen + len(ids)), np.int64),
                    np.arange(seen, seen + len(ids))[None],
                    *past,
                ],
            )
        )
        start = time.perf_counter()
        logits, *past = session.run(None, feeds)
        if i > 0:  # step 0 is the prefill
            steps.append(time.perf_counter() - start)
        seen += len(ids)
        ids = np.array([int(logits[0, -1].argmax())])
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="decode runs per contender")
    parser.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime contenders")
    args = parser.parse_args()

    from vlm_course.weights import load_smollm2

    decoder, _ = load_smollm2()
    cfg = decoder.cfg
    print(
        f"SmolLM2-135M: {decoder.num_parameters / 1e6:.1f}M parameters, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )

    contenders = {
        "torch fp32 (our Decoder + KV cache)": (
            "fp32",
            lambda: torch_decode_step_seconds(decoder, args.prompt_tokens, args.new_tokens),
        )
    }
    tmp = tempfile.TemporaryDirectory()
    if not args.no_onnx:
        from vlm_course.deploy.onnx_export import export_decoder, make_session
        from vlm_course.deploy.quantize import quantize_int8

        folder = Path(tmp.name)
        start = time.perf_counter()
        export_decoder(decoder, folder / "decoder.onnx")
        quantize_int8(folder / "decoder.onnx", folder / "decoder_int8.onnx")
        quantize_int8(folder / "decoder.onnx", folder / "decoder_block8.onnx", scheme="blockwise")
        print(f"exported + quantised the decoder in {time.perf_counter() - start:.0f} s")
        embed = decoder.embed_tokens.weight.detach().numpy()
        for name, file, fmt in (
            ("onnxruntime fp32", "decoder.onnx", "fp32"),
            ("onnxruntime int8 dynamic", "decoder_int8.onnx", "int8"),
            ("onnxruntime int8 blockwise", "decoder_block8.onnx", 9),
        ):
            session = make_session(folder / file)
            contenders[name] = (
                fmt,
                lambda s=session: onnx_decode_step_seconds(
                    s, embed, cfg, args.prompt_tokens, args.new_tokens
                ),
            )

    bandwidth = {"copy": [], "read": []}
    seconds = {name: [] for name in contenders}
    for _ in range(args.repeats):  # interleave everything so background load hits all alike
        for kind in bandwidth:
            bandwidth[kind].append(measure_memory_bandwidth(kind=kind))
        for name, (_, run) in contenders.items():
            seconds[name].extend(run())
    # Best and median: on a shared machine the best step and the best bandwidth are the least disturbed.
    best_bw = {kind: max(v) for kind, v in bandwidth.items()}
    median_bw = {kind: statistics.median(v) for kind, v in bandwidth.items()}
    context = args.prompt_tokens + args.new_tokens // 2  # average cache length during the decode steps
    print(
        f"memory bandwidth, best / median of {args.repeats}: copy {best_bw['copy'] / GB:.1f} / "
        f"{median_bw['copy'] / GB:.1f} GB/s, read {best_bw['read'] / GB:.1f} / "
        f"{median_bw['read'] / GB:.1f} GB/s; "
        f"average context {context} tokens\n"
    )
    print(
        f"{'contender':36s} {'MB/token':>8s} | {'roofline':>8s} {'best':>6s} {'ratio':>6s} {'(read)':>6s} | "
        f"{'roofline':>8s} {'median':>6s} {'ratio':>6s}"
    )
    for name, (fmt, _) in contenders.items():
        roof = decode_roofline(cfg, best_bw["copy"], weights=fmt, kv_bits="fp32", context_length=context)
        roof_read = decode_roofline(cfg, best_bw["read"], weights=fmt, kv_bits="fp32", context_length=context)
        roof_median = decode_roofline(
            cfg, median_bw["copy"], weights=fmt, kv_bits="fp32", context_length=context
        )
        best, median = 1 / min(seconds[name]), 1 / statistics.median(seconds[name])
        print(
            f"{name:36s} {roof.bytes_per_step / MB:8.1f} | {roof.tokens_per_s:8.1f} {best:6.1f} "
            f"{best / roof.tokens_per_s:6.2f} {best / roof_read.tokens_per_s:6.2f} | "
            f"{roof_median.tokens_per_s:8.1f} {median:6.1f} {median / roof_median.tokens_per_s:6.2f}"
        )
    print(
        "\ntokens/s. best: fastest decode step vs roofline at the best copy bandwidth ('read': at the best "
        "read-only bandwidth); median: median step vs roofline at the median copy bandwidth."
    )
    print("\nSame formula on the Jetson Orin Nano (upper bounds, context 512):")
    for fmt in ("fp16", "int8", "q4_0"):
        nano = decode_roofline(cfg, ORIN_NANO_8GB, weights=fmt, kv_bits="fp16", context_length=512)
        superb = decode_roofline(cfg, ORIN_NANO_SUPER, weights=fmt, kv_bits="fp16", context_length=512)
        print(
            f"  {fmt:5s} {nano.bytes_per_step / MB:7.1f} MB/token: "
            f"{nano.tokens_per_s:6.0f} tokens/s at 68 GB/s, "
            f"{superb.tokens_per_s:6.0f} at 102 GB/s"
        )
    tmp.cleanup()


if __name__ == "__main__":
    main()
