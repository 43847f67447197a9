"""The design space, measured: each connector and fusion trained the same way on the same data, in one run.

    python benchmarks/bench_design_space.py --profile smol --steps 60 --rows 400 --eval-rows 40
    python benchmarks/bench_design_space.py --profile tiny --steps 3 --rows 8 --eval-rows 2      (a smoke run)

Every variant starts from the profile's backbones (smol: the course's pretrained ViT and SmolLM2-135M-Instruct;
tiny: random) and trains with one recipe: ViT frozen, the connector (and the fusion's new blocks) trained fully,
LoRA on the decoder, as Idefics2's comparison does (arXiv 2405.02246, section 3). Same rows of mini-cauldron's
shapes, count and position subsets, same order, same steps, same seed. Then each is evaluated on held-out rows,
once with the right image and once with another scene's image (`with_other_images`): a model that reads the
picture falls towards chance there; one that guesses from the text does not.

Columns: image tokens in the decoder's input, tokens the connector makes (what cross-attention reads), trainable
parameters, seconds per step (process CPU time, which other jobs on a shared machine do not inflate; wall time as
well), the last training loss, the held-out answer loss with the right image and with another scene's image (it
moves long before accuracy does; the gap is what the image is worth), held-out accuracy per subset and mean, and
the mean accuracy with another scene's image.

Variants (--variants, comma-separated): linear, linear_r1, mlp, mlp_r1, perceiver, cross_attention, split.
`split` (Idefics3's image splitting: tiles + a global view) runs only where `VLMConfig.image_splitting` exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLM_COURSE_OFFLINE", "1")

import torch  # noqa: E402

from vlm_course.config import FusionConfig, ProjectorConfig, VLMConfig, get_profile  # noqa: E402
from vlm_course.data import load_mini_cauldron  # noqa: E402
from vlm_course.evaluation import evaluate, with_other_images  # noqa: E402
from vlm_course.processing import VLMProcessor  # noqa: E402
from vlm_course.training import TrainConfig, Trainer, VLMCollator, make_loss_eval  # noqa: E402
from vlm_course.vlm import VisionLanguageModel  # noqa: E402

SUBSETS = ("shapes", "count", "position")
VARIANTS = ("linear", "linear_r1", "mlp", "mlp_r1", "perceiver", "cross_attention", "split")
DEFAULT_VARIANTS = ("linear", "linear_r1", "mlp", "perceiver", "cross_attention")


def variant_config(name: str, base: VLMConfig) -> VLMConfig | None:
    """The profile's config with this variant's connector and fusion (None: the variant needs a missing feature)."""
    config = VLMConfig.from_dict(base.to_dict())
    r = base.projector.shuffle_factor
    if name == "linear":
        config.projector = ProjectorConfig(kind="linear", shuffle_factor=r)
    elif name == "linear_r1":
        config.projector = ProjectorConfig(kind="linear", shuffle_factor=1)
    elif name == "mlp":
        config.projector = ProjectorConfig(kind="mlp", shuffle_factor=r)
    elif name == "mlp_r1":
        config.projector = ProjectorConfig(kind="mlp", shuffle_factor=1)
    elif name == "perceiver":
        # Idefics2 resamples 729 patches to 64 tokens (11x fewer); here all patches to half of pixel shuffle's tokens
        blocks = (config.vision.grid_size // r) ** 2
        config.projector = ProjectorConfig(kind="perceiver", shuffle_factor=1, num_queries=max(1, blocks // 2),
                                           resampler_layers=2)
    elif name == "cross_attention":
        config.projector = ProjectorConfig(kind="linear", shuffle_factor=r)
        layers = config.decoder.num_layers
        config.fusion = FusionConfig(kind="cross_attention", cross_attention_every=max(1, layers // 6))
    elif name == "split":
        if "image_splitting" not in {f.name for f in dataclasses.fields(VLMConfig)}:
            return None
        config.projector = ProjectorConfig(kind="linear", shuffle_factor=r)
        config.image_layout, config.image_splitting = "idefics3", True
        config.split_longest_edge = 2 * config.vision.image_size  # 2 x 2 tiles and the global view
    else:
        raise ValueError(f"unknown variant {name!r}: choose among {VARIANTS}")
    return VLMConfig.from_dict(config.to_dict())  # validated again as a whole


def build(profile: str, config: VLMConfig, seed: int):
    torch.manual_seed(seed)
    base = get_profile(profile)
    model = VisionLanguageModel.from_profile(dataclasses.replace(base, config=config))
    processor = VLMProcessor.from_config(model.config, system_prompt=None)
    model.config.image_token_id = processor.image_token_id
    if len(processor.tokenizer) > model.config.decoder.vocab_size:  # Idefics3's wrappers (the split variant)
        model.resize_vocabulary(len(processor.tokenizer))
    return model, processor


def accuracy(model, processor, rows, max_new_tokens: int) -> dict:
    result = evaluate(model, processor, rows, batch_size=16, max_new_tokens=max_new_tokens, progress=False)
    return {**result.by_subset, "mean": result.overall}


def run_variant(name: str, args, train_rows, eval_rows) -> dict | None:
    config = variant_config(name, get_profile(args.profile).config)
    if config is None:
        return None
    model, processor = build(args.profile, config, args.seed)
    cfg = TrainConfig(vision="frozen", projector="full", decoder="lora", lr_lora=args.lr_lora,
                      lr_projector=args.lr_projector, batch_size=args.batch_size, max_steps=args.steps,
                      warmup_fraction=0.1, precision="fp32", progress=False, seed=args.seed,
                      output_dir=os.path.join(args.output_dir, name))
    trainer = Trainer(model, processor, train_rows, cfg)
    trainable = sum(trainer.trainable.values())
    wall, cpu = time.perf_counter(), time.process_time()
    history = trainer.fit()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    budget = max(len(processor.text_ids(t["assistant"])) for row in eval_rows for t in row["texts"][:1]) + 2
    # image tokens in the decoder's input, counted on a real prompt (a split image has several views)
    prompt = processor([eval_rows[0]["images"]], ["?"])
    in_text = int((prompt["input_ids"] == processor.image_token_id).sum())
    right = accuracy(model, processor, eval_rows, budget)
    other = accuracy(model, processor, with_other_images(eval_rows), budget)
    # the held-out answer loss, which moves long before the accuracy does: its rise with another scene's image is
    # what the image is worth to the model
    collator = VLMCollator(processor)
    model.eval()
    with torch.no_grad():
        loss = make_loss_eval(collator, eval_rows)(model, args.steps)["eval_loss"]
        other_loss = make_loss_eval(collator, with_other_images(eval_rows))(model, args.steps)["eval_loss"]
    return {"variant": name, "connector": config.projector.kind, "shuffle": config.projector.shuffle_factor,
            "fusion": config.fusion.kind, "decoder_tokens": in_text,
            "connector_tokens": config.connector_tokens_per_image, "trainable": trainable,
            "cpu_s_per_step": cpu / args.steps, "wall_s_per_step": wall / args.steps,
            "final_loss": history["train"][-1]["loss"], "accuracy": right, "other_image": other,
            "eval_loss": loss, "other_image_loss": other_loss}


def format_table(results: list[dict]) -> str:
    head = (f"{'variant':<16}{'fusion':<16}{'tokens':>7}{'conn':>6}{'trainable':>11}{'cpu s/step':>11}"
            f"{'wall s':>8}{'loss':>7}{'held-out loss':>14}{'other img':>10}" + "".join(f"{s:>9}" for s in SUBSETS)
            + f"{'mean':>7}{'other img':>10}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['variant']:<16}{r['fusion']:<16}{r['decoder_tokens']:>7}{r['connector_tokens']:>6}"
                     f"{r['trainable'] / 1e6:>10.2f}M{r['cpu_s_per_step']:>11.2f}{r['wall_s_per_step']:>8.2f}"
                     f"{r['final_loss']:>7.3f}{r['eval_loss']:>14.3f}{r['other_image_loss']:>10.3f}" + "".join(f"{r['accuracy'].get(s, float('nan')):>9.2f}" for s in SUBSETS)
                     + f"{r['accuracy']['mean']:>7.2f}{r['other_image']['mean']:>10.2f}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", choices=("tiny", "smol"), default="tiny")
    p.add_argument("--steps", type=int, default=60, help="optimiser steps per variant")
    p.add_argument("--rows", type=int, default=200, help="training rows per subset")
    p.add_argument("--eval-rows", type=int, default=40, help="held-out rows per subset")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr-lora", type=float, default=1e-3)
    p.add_argument("--lr-projector", type=float, default=2e-3)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, among {VARIANTS}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None, help="keep each variant's checkpoint here (default: a temporary "
                   "folder, removed at the end)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}: choose among {VARIANTS}")
    scratch = None
    if args.output_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="design_space-")
        args.output_dir = scratch.name
    train_rows = list(load_mini_cauldron("train", SUBSETS, max_per_subset=args.rows, verbose=False))
    eval_rows = list(load_mini_cauldron("test", SUBSETS, max_per_subset=args.eval_rows, verbose=False))
    print(f"profile {args.profile}, {args.steps} steps x batch {args.batch_size}, {len(train_rows)} training rows, "
          f"{len(eval_rows)} held-out rows ({', '.join(SUBSETS)}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    results, skipped = [], []
    start = time.perf_counter()
    for name in names:
        result = run_variant(name, args, train_rows, eval_rows)
        if result is None:
            skipped.append(name)
            continue
        results.append(result)
        print(f"  {name}: {result['accuracy']['mean']:.2f} held-out, {result['other_image']['mean']:.2f} with another "
              f"image, {result['cpu_s_per_step']:.2f} cpu s/step ({time.perf_counter() - start:.0f} s so far, "
              f"load average {os.getloadavg()[0]:.2f})", flush=True)
    print()
    print(format_table(results))
    if skipped:
        print(f"skipped (not in this version of the library): {', '.join(skipped)}")
    print(f"total {time.perf_counter() - start:.0f} s; load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    if scratch is not None:
        scratch.cleanup()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
