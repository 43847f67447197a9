"""Command line: `python -m vlm_course eval ...` writes results.json, table.txt and gallery.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import writable_folder_error, write_text_atomically
from .gallery import error_gallery
from .loop import ImageGain, evaluate
from .mmstar import load_mmstar


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vlm_course eval",
        description="Evaluate a model on mini-cauldron (or MMStar) and write results.json, table.txt and "
                    "gallery.png into --out.")
    parser.add_argument("--model", help="folder of a saved model (save_pretrained); default: the profile's "
                                        "model, with random weights where the profile has none")
    parser.add_argument("--profile", help="profile to build when no --model is given: tiny, smol or nano "
                                          "(default: $VLM_COURSE_PROFILE, else chosen by the hardware)")
    parser.add_argument("--split", help="mini-cauldron split (default test) or MMStar split (default val)")
    parser.add_argument("--subsets", help="comma-separated mini-cauldron subsets, e.g. shapes,count (default: all)")
    parser.add_argument("--limit", type=_positive_int, help="at most this many questions per subset "
                                                            "(with --mmstar: in total)")
    parser.add_argument("--mmstar", metavar="PATH", help="evaluate on MMStar instead: a local .parquet/.jsonl "
                                                         "file or folder (or 'Lin-Chen/MMStar' when online)")
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.add_argument("--max-new-tokens", type=_positive_int,
                        help="tokens generated per answer (default: the longest gold answer + 8, at least 16)")
    parser.add_argument("--image-gain", action="store_true",
                        help="also answer with blank images and report the gain from the image")
    parser.add_argument("--gallery", type=_positive_int, default=12, help="wrong answers shown in gallery.png")
    parser.add_argument("--out", default="runs/eval", help="output folder (default runs/eval)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights of an untrained model")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _load_eval_model(args: argparse.Namespace):
    """(model, processor, description) from --model or --profile."""
    import torch

    from ..config import get_profile
    from ..processing import VLMProcessor
    from ..vlm import VisionLanguageModel
    from ..weight_files import tokenizer_problem

    if args.model:
        model, description = VisionLanguageModel.from_pretrained(args.model), f"model {args.model}"
    else:
        profile = get_profile(args.profile)
        torch.manual_seed(args.seed)  # the untrained parts are random: the same seed gives the same model
        model = VisionLanguageModel.from_profile(profile)
        description = f"profile {profile.name} (not trained on images)"
    if tokenizer_problem(model.config.tokenizer):
        raise FileNotFoundError(tokenizer_problem(model.config.tokenizer))
    return model, VLMProcessor.from_config(model.config), description


def _load_eval_rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    if args.mmstar:
        split = args.split or "val"
        return load_mmstar(args.mmstar, split=split, limit=args.limit), f"MMStar {args.mmstar} ({split})"
    from ..data.cauldron import load_mini_cauldron

    split = args.split or "test"
    subsets = [name.strip() for name in args.subsets.split(",") if name.strip()] if args.subsets else None
    rows = load_mini_cauldron(split, subsets=subsets, max_per_subset=args.limit, verbose=False,
                              min_image_size=getattr(args, "min_image_size", 1))
    return list(rows), f"mini-cauldron {split}"


def eval_main(argv: Sequence[str] | None = None) -> int:
    """`python -m vlm_course eval`: evaluate, write results.json, table.txt and gallery.png, print the table."""
    parser = build_eval_parser()
    args = parser.parse_args(argv)
    if args.mmstar and args.subsets:
        parser.error("--subsets chooses mini-cauldron subsets; MMStar has none (use --limit to evaluate fewer)")
    from ..weight_files import apply_offline_env

    apply_offline_env()
    out_problem = writable_folder_error(Path(args.out), "--out")  # before the evaluation, not after it
    if out_problem:
        print(f"eval: {out_problem}", file=sys.stderr)
        return 2
    try:
        model, processor, model_name = _load_eval_model(args)
        args.min_image_size = model.config.vision.patch_size  # smaller images: skipped and counted, not a crash
        rows, data_name = _load_eval_rows(args)
    except (FileNotFoundError, ValueError, RuntimeError) as error:  # a wrong path or name, or no network
        print(f"eval: {error}", file=sys.stderr)
        return 2
    options = {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "progress": not args.no_progress}
    result = evaluate(model, processor, rows, **options)
    result.meta.update(model=model_name, data=data_name)

    out = Path(args.out)
    result.to_json(out / "results.json")
    table = result.format_table()
    written = ["results.json", "table.txt", "gallery.png"]
    if args.image_gain:
        gain = ImageGain(result, evaluate(model, processor, rows, blank_image=True, **options))
        table += "\n\nGain from the image (real image minus blank image)\n" + gain.format_table()
        write_text_atomically(out / "image_gain.json", json.dumps(gain.to_dict(), indent=2) + "\n")
        written.append("image_gain.json")
    write_text_atomically(out / "table.txt", table + "\n")
    error_gallery(result, n=args.gallery).savefig(out / "gallery.png", dpi=100)

    print(table)
    print(f"{model_name} on {data_name}: overall {result.overall:.3f} (mean over {len(result.subsets)} subsets, "
          f"{len(result.records)} questions); wrote {', '.join(written)} to {out}")
    return 0
