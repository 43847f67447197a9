"""Export report: build a bundle and measure every round trip on it, for a profile or a saved model.

    python -m vlm_course.deploy.report --profile smol --out /tmp/smol-bundle [--rows 4]
    python -m vlm_course.deploy.report --model runs/exp1/model --out /tmp/bundle

Prints: ONNX vs PyTorch max abs differences; run.py (onnxruntime) vs PyTorch greedy tokens on held-out
mini-cauldron questions; int8 size ratio and accuracy change (same questions); GGUF f16 and f32 round
trips through transformers' reader. The lesson on deployment shows these numbers; rerun after training.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def held_out_rows(per_subset: int) -> list[dict]:
    from ..data.cauldron import load_mini_cauldron

    return list(load_mini_cauldron("test", max_per_subset=per_subset, verbose=False))


def greedy_agreement(model, bundle_dir, rows, max_new_tokens: int) -> float:
    """Fraction of questions where run.py's runner and the PyTorch model generate the same token ids."""
    from ..processing import VLMProcessor
    from .quantize import _first_turn
    from .runtime import load_runtime

    processor = VLMProcessor.from_config(model.config)
    runner = load_runtime().VLMRunner(bundle_dir, check_hashes=False)
    same = 0
    for row in rows:
        image, question, _, _ = _first_turn(row)
        batch = processor(image, question)
        ours = model.generate(
            batch["input_ids"],
            batch["pixel_values"],
            batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            eos_token_id=processor.eos_token_id,
        )[0].tolist()
        same += runner.generate_ids(image, question, max_new_tokens) == ours
    return same / len(rows)


def main(argv=None) -> int:
    from ..processing import load_tokenizer
    from ..vlm import VisionLanguageModel
    from .bundle import build_bundle, check_bundle_target, load_model_for_export
    from .gguf_export import check_gguf_roundtrip, export_gguf
    from .onnx_export import check_onnx_parity
    from .quantize import compare_int8_accuracy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", help="build the model of a profile (tiny, smol)")
    source.add_argument("--model", help="a folder written by save_pretrained")
    parser.add_argument("--out", required=True, help="bundle folder to (re)create")
    parser.add_argument("--rows", type=int, default=4, help="held-out questions per mini-cauldron subset")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--skip-gguf", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random init of untrained parts")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    try:  # before any work: only previous bundles are replaced, never the model, the cwd or other files
        for out in (args.out, f"{args.out}-blockwise"):
            check_bundle_target(out, overwrite=True, source=args.model)
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)  # a profile's untrained parts (e.g. smol's projector) are random
    model = VisionLanguageModel.from_profile(args.profile) if args.profile else args.model
    model = load_model_for_export(model)
    start = time.perf_counter()
    bundle = build_bundle(
        model, args.out, int8=True, gguf=not args.skip_gguf, gguf_dtype="f16", overwrite=True
    )
    print(
        f"bundle {bundle} built in {time.perf_counter() - start:.0f} s "
        f"({sum(p.stat().st_size for p in bundle.rglob('*') if p.is_file()) / 2**20:.0f} MB)"
    )

    parity = check_onnx_parity(model, bundle)
    print(
        f"ONNX vs PyTorch (fp32, max abs): image embeds {parity.image_embeds:.2e}, prefill logits "
        f"{parity.prefill_logits:.2e}, decode logits {parity.decode_logits:.2e}, "
        f"KV cache {parity.present_kv:.2e}"
    )

    rows = held_out_rows(args.rows)
    with torch.no_grad():
        agreement = greedy_agreement(model, bundle, rows, args.max_new_tokens)
    print(
        f"run.py (onnxruntime CPU) vs PyTorch: identical greedy tokens on {agreement:.0%} of {len(rows)} "
        "held-out questions"
    )
    report = compare_int8_accuracy(bundle, rows, max_new_tokens=args.max_new_tokens, progress=False)
    print(f"dynamic int8: {report.summary()}")
    blockwise = build_bundle(
        model,
        f"{args.out}-blockwise",
        int8=True,
        int8_scheme="blockwise",
        gguf=False,
        verify=False,
        overwrite=True,
    )
    report = compare_int8_accuracy(blockwise, rows, max_new_tokens=args.max_new_tokens, progress=False)
    print(f"blockwise int8: {report.summary()}")

    if not args.skip_gguf:
        tokenizer = load_tokenizer(model.config.tokenizer)
        f16 = check_gguf_roundtrip(model.decoder, tokenizer, bundle / "decoder-f16.gguf", "f16")
        with tempfile.TemporaryDirectory() as tmp:
            path = export_gguf(model.decoder, tokenizer, Path(tmp) / "decoder-f32.gguf", dtype="f32")
            f32 = check_gguf_roundtrip(model.decoder, tokenizer, path, "f32", check_tokenizer=False)
        for r in (f32, f16):
            print(
                f"GGUF {r.dtype} via transformers: weights equal {r.weights_equal}, tokenizer equal "
                f"{r.tokenizer_equal}, logits max abs diff {r.max_abs_logits:.2e} "
                "vs our model with the file's "
                f"rounding, {r.max_abs_vs_fp32:.2e} vs fp32 (logits up to {r.logits_scale:.1f})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
