"""The course model in llama.cpp against PyTorch: answer agreement per subset, and TTFT / decode speed.

    nice -n 10 .venv/bin/python benchmarks/bench_llama_cpp.py [--folder IDEFICS3_DIR] [--per-subset 50]
    nice -n 10 .venv/bin/python benchmarks/bench_llama_cpp.py --types f16 --quantize Q4_0 --only-quantized

Without --folder it builds the `smol` profile model in Idefics3's layout (the course's ViT + the real
SmolLM2-135M-Instruct; the projector is fresh, seed 0, so the answers test the runtime, not the model's skill)
and saves it with save_idefics3 into --work. Any saved Idefics3 folder can be measured the same way, e.g. a
trained idefics3-layout model. Needs llama.cpp built by `make setup`.

Prints, per weight type (f16, q8_0): agreement of greedy answers with `vlm_course.vlm.answer` on the prompt llama.cpp
builds (`LlamaCppLayout`), on the first N held-out questions (test split) of each subset, and how many of each
side's answers are right (a trained model's, e.g. `demo.save_as_idefics3` of `demo --layout idefics3`); then the median
time-to-first-token and decode tokens/s of single-turn CLI runs beside the decode roofline at this machine's
measured bandwidth.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from vlm_course.data import load_mini_cauldron
from vlm_course.deploy import llama_cpp
from vlm_course.deploy.budget import measure_memory_bandwidth
from vlm_course.evaluation.scoring import score_answer
from vlm_course.processing import VLMProcessor
from vlm_course.vlm import VisionLanguageModel


def smol_idefics3(folder: Path) -> Path:
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    model = VisionLanguageModel.from_profile("smol")
    model.config.image_layout = "idefics3"
    processor = VLMProcessor.from_config(model.config)
    model.resize_vocabulary(len(processor.tokenizer)).eval()
    return model.save_idefics3(folder, processor)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", help="a saved Idefics3 folder (default: the smol profile model, saved in --work)")
    parser.add_argument("--work", default="/tmp/vlm_course_llama_cpp", help="where the GGUF files go")
    parser.add_argument("--subsets", default="shapes,count,position")
    parser.add_argument("--per-subset", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--speed-runs", type=int, default=5)
    parser.add_argument("--types", default="f16,q8_0", help="what convert_hf_to_gguf.py writes")
    parser.add_argument("--quantize", default="", help="also llama-quantize the first type's text model, e.g. Q4_0")
    parser.add_argument("--only-quantized", action="store_true", help="measure only the --quantize pairs")
    parser.add_argument("--no-speed", action="store_true", help="skip the timed single-turn runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(args.work)
    folder = Path(args.folder) if args.folder else smol_idefics3(work / "smol-idefics3")
    started = time.monotonic()
    pairs = [llama_cpp.convert_idefics3(folder, work / "gguf", t) for t in args.types.split(",")]
    quantized = [llama_cpp.quantize_text(pairs[0], q) for q in args.quantize.split(",") if q]
    pairs = quantized if args.only_quantized else pairs + quantized
    print(f"converted in {time.monotonic() - started:.0f} s: "
          + ", ".join(f"{p.outtype} text {p.sizes_mb()[0]:.0f} MB + mmproj {p.sizes_mb()[1]:.1f} MB" for p in pairs))

    rows = load_mini_cauldron("test", subsets=args.subsets.split(","), max_per_subset=args.per_subset, verbose=False)
    model = VisionLanguageModel.from_idefics3(folder)
    started = time.monotonic()
    results = llama_cpp.compare_answers(folder, pairs, rows, args.max_new_tokens, model=model)
    print(f"\nagreement of greedy answers ({args.max_new_tokens} new tokens at most), {time.monotonic() - started:.0f} s")
    print("| subset | " + " | ".join(p.outtype for p in pairs) + " |")
    print("|---|" + "---|" * len(pairs))
    for subset in dict.fromkeys(r.subset for r in results):
        cells = [next(r for r in results if r.subset == subset and r.outtype == p.outtype) for p in pairs]
        print(f"| {subset} | " + " | ".join(f"{c.same}/{c.total} ({c.rate:.0%})" for c in cells) + " |")
    # Right answers (the eval loop's scoring) of each side on llama.cpp's prompt: for a trained model, whether the
    # runtime keeps what it learnt (for an untrained one, both near 0)
    gold = {}
    for row in rows:
        name = (row.get("source") or row["texts"][0].get("source", "?")).removeprefix("synthetic-")
        gold.setdefault(name, []).append(row["texts"][0]["assistant"])

    def right(subset, k, cell):
        """Share of `cell`'s answers (k = 1: PyTorch's, 2: llama.cpp's) that score as right against the gold."""
        return sum(score_answer(subset, e[k], g) for e, g in zip(cell.examples, gold[subset])) / cell.total

    print("\nright answers on llama.cpp's prompt (exact match after VQA normalisation)")
    print("| subset | PyTorch | " + " | ".join(p.outtype for p in pairs) + " |")
    print("|---|---|" + "---|" * len(pairs))
    for subset in dict.fromkeys(r.subset for r in results):
        cells = [next(r for r in results if r.subset == subset and r.outtype == p.outtype) for p in pairs]
        print(f"| {subset} | {right(subset, 1, cells[0]):.2f} | "
              + " | ".join(f"{right(subset, 2, c):.2f}" for c in cells) + " |")
    for r in results:
        for question, ours, theirs in r.examples[:2] + [e for e in r.examples if e[1] != e[2]][:2]:
            print(f"  {r.outtype} {r.subset}: {question!r} torch={ours!r} llama.cpp={theirs!r}")

    if args.no_speed:
        return 0
    bandwidth = measure_memory_bandwidth()
    images = [row["images"][0] for row in rows[: args.speed_runs]]
    print(f"\nspeed (single-turn runs, 1 thread, median of {len(images)}; bandwidth {bandwidth / 1e9:.1f} GB/s "
          "measured by torch copy)")
    for pair in pairs:
        report = llama_cpp.measure_speed(pair, model.config, images, rows[0]["texts"][0]["user"], bandwidth,
                                         max_new_tokens=32)
        print(report.line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
