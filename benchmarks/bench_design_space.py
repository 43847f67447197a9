"""The design space, measured: each connector and fusion trained the same way on the same data, in one run.

    python benchmarks/bench_design_space.py --profile smol --vision demo --fit-words --subsets shapes \
        --rows 1600 --eval-rows 100 --steps 200 --lr-projector 1e-4 --lr-fusion 1e-3 --lr-lora 1e-3 \
        --variants linear,mlp,perceiver,cross_attention            (the ranking run of docs/design_space.md)
    python benchmarks/bench_design_space.py ... --data small_objects --variants linear,split   (image splitting)
    python benchmarks/bench_design_space.py --profile tiny --steps 3 --rows 8 --eval-rows 2      (a smoke run)
    python benchmarks/bench_design_space.py --show runs/a.json runs/b.json   (one table from several --json runs)

Every variant starts from the same backbones (smol: SmolLM2-135M-Instruct and the course's pretrained ViT, or with
--vision demo the demo's block-pretrained ViT, 72 px in a 9 x 9 grid shuffled by 3 into 3 x 3 blocks; tiny: random)
and trains with one recipe: ViT frozen, the connector (and the fusion's new blocks) trained fully, LoRA on the
decoder, as Idefics2's comparison does (arXiv 2405.02246, section 3). With --fit-words every connector is first
fitted, without a decoder pass, to make each block's token the mean embedding of the two words naming what the
block holds (the demo's words stage): a new connector otherwise spends the whole budget learning what the decoder
reads (docs/design_space.md, the run without it). Same rows, same order, same steps, same seed. Then each is
evaluated on held-out rows, once with the right image and once with another scene's image (`with_other_images`):
a model that reads the picture falls towards chance there; one that guesses from the text does not.

Columns: image tokens in the decoder's input, tokens the connector makes (what cross-attention reads), trainable
parameters, seconds per step (process CPU time, which other jobs on a shared machine do not inflate; wall time as
well), the last training loss, the held-out answer loss with the right image and with another scene's image (it
moves long before accuracy does; the gap is what the image is worth), held-out accuracy per subset and mean, and
the mean accuracy with another scene's image.

Variants (--variants, comma-separated): linear, linear_r1, mlp, mlp_r1, perceiver, cross_attention, split.
`split` is Idefics3's image splitting (2 x 2 tiles + the global view); it matters on --data small_objects, large
pictures of small objects (`vlm_course.data.synthetic.small_objects`), where the shrunk picture loses them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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
from vlm_course.data.synthetic import small_objects  # noqa: E402
from vlm_course.evaluation import evaluate, with_other_images  # noqa: E402
from vlm_course.processing import VLMProcessor  # noqa: E402
from vlm_course.training import TrainConfig, Trainer, VLMCollator, make_loss_eval  # noqa: E402
from vlm_course.vlm import VisionLanguageModel  # noqa: E402

SUBSETS = ("shapes", "count", "position")
VARIANTS = ("linear", "linear_r1", "mlp", "mlp_r1", "perceiver", "cross_attention", "split")
DEFAULT_VARIANTS = ("linear", "linear_r1", "mlp", "perceiver", "cross_attention")


def variant_config(name: str, base: VLMConfig) -> VLMConfig:
    """The profile's config with this variant's connector and fusion."""
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
        # Idefics2 resamples 729 patches to 64 tokens (11x fewer); here all patches to as many tokens as pixel
        # shuffle makes, so the two differ in how they make the tokens, not in how many
        blocks = (config.vision.grid_size // r) ** 2
        config.projector = ProjectorConfig(kind="perceiver", shuffle_factor=1, num_queries=blocks,
                                           resampler_layers=2)
    elif name == "cross_attention":
        config.projector = ProjectorConfig(kind="linear", shuffle_factor=r)
        layers = config.decoder.num_layers
        config.fusion = FusionConfig(kind="cross_attention", cross_attention_every=max(1, layers // 6))
    elif name == "split":
        config.projector = ProjectorConfig(kind="linear", shuffle_factor=r)
        config.image_layout, config.image_splitting = "idefics3", True
        config.split_longest_edge = 2 * config.vision.image_size  # 2 x 2 tiles and the global view
    else:
        raise ValueError(f"unknown variant {name!r}: choose among {VARIANTS}")
    return VLMConfig.from_dict(config.to_dict())  # validated again as a whole


def base_profile(profile: str, vision: str):
    """The profile, or (vision="demo") the profile with the demo's block-pretrained ViT (assets/vit_demo: 72 px in
    8 px patches, a 9 x 9 grid, pixel-shuffled by 3 into the 3 x 3 blocks a person names)."""
    base = get_profile(profile)
    if vision == "profile":
        return base
    from vlm_course.vision import VisionEncoder
    from vlm_course.weights import assets_dir

    path = str(assets_dir() / "vit_demo")
    config = VLMConfig.from_dict(base.config.to_dict())
    config.vision = VisionEncoder.from_siglip(path).cfg
    config.projector = ProjectorConfig(shuffle_factor=3)
    return dataclasses.replace(base, vision_weights=path, config=VLMConfig.from_dict(config.to_dict()))


def build(base, config: VLMConfig, seed: int):
    torch.manual_seed(seed)
    model = VisionLanguageModel.from_profile(dataclasses.replace(base, config=config))
    processor = VLMProcessor.from_config(model.config, system_prompt=None)
    model.config.image_token_id = processor.image_token_id
    if len(processor.tokenizer) > model.config.decoder.vocab_size:  # Idefics3's wrappers (the split variant)
        model.resize_vocabulary(len(processor.tokenizer))
    return model, processor


def accuracy(model, processor, rows, max_new_tokens: int) -> dict:
    result = evaluate(model, processor, rows, batch_size=16, max_new_tokens=max_new_tokens, progress=False)
    return {**result.by_subset, "mean": result.overall}


def relative_error(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ||token - target||^2 / ||target||^2: the words stage's loss and its held-out score."""
    return (((tokens - targets) ** 2).sum(-1) / (targets**2).sum(-1)).mean()


def fit_connector_to_words(model, processor, scenes: int, steps: int, seed: int) -> float:
    """Stage 1, the same for every design: the connector's 9 tokens are fitted to say what each block holds, as the
    mean of the decoder's embeddings of its two words (the demo's words stage, one token per block as Idefics3
    writes them). No decoder pass. The linear connector (also the one cross-attention reads) is solved in closed
    form; the MLP and the perceiver (query i -> block i) by AdamW on the frozen ViT's patches. Returns the
    relative squared error on 256 held-out scenes."""
    from vlm_course.demo import fit_projector_to_words, word_embeddings, word_targets

    # the 3 x 3 blocks' words, whatever the connector's own grid (a perceiver reads all 81 patches)
    data, test = word_targets(processor, scenes, seed, side=3), word_targets(processor, 256, seed + 1, side=3)
    model.eval()
    with torch.no_grad():
        test_patches = model.vision(test["pixel_values"].float())
        test_targets = word_embeddings(model, test["word_ids"])
        if model.projector(test_patches[:1]).shape[1] != test_targets.shape[1]:
            raise ValueError("the words stage names the 3 x 3 blocks: it needs 9 tokens per view (--vision demo)")
    if model.config.projector.kind == "linear":
        fit_projector_to_words(model, data)
    else:
        with torch.no_grad():
            patches = torch.cat([model.vision(data["pixel_values"][i:i + 500].float()) for i in range(0, scenes, 500)])
            targets = word_embeddings(model, data["word_ids"])
        if hasattr(model.projector, "norm"):
            # the resampler ends in an RMSNorm: start it at the words' scale, not at 1 (tokens ~12x too loud, a
            # relative error of ~145), so the steps go into the content
            with torch.no_grad():
                model.projector.norm.weight.fill_(float(targets.pow(2).mean().sqrt()))
        params = list(model.projector.parameters())
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
        generator = torch.Generator().manual_seed(seed)
        for step in range(steps):
            for group in opt.param_groups:  # cosine from 1e-3 to 0
                group["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
            pick = torch.randint(len(patches), (64,), generator=generator)
            loss = relative_error(model.projector(patches[pick]), targets[pick])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float(relative_error(model.projector(test_patches), test_targets))


def run_variant(name: str, args, train_rows, eval_rows) -> dict:
    base = base_profile(args.profile, args.vision)
    config = variant_config(name, base.config)
    model, processor = build(base, config, args.seed)
    fit_error, fit_seconds = None, 0.0
    if args.fit_words:
        fit_seconds = time.process_time()
        fit_error = fit_connector_to_words(model, processor, args.word_scenes, args.word_steps, args.seed + 100)
        fit_seconds = time.process_time() - fit_seconds
        print(f"  {name}: connector fitted to the blocks' words, held-out relative error {fit_error:.3f} "
              f"({fit_seconds:.0f} cpu s)", flush=True)
    cfg = TrainConfig(vision="frozen", projector="full", decoder="lora", lr_lora=args.lr_lora,
                      lr_projector=args.lr_projector, lr_fusion=args.lr_fusion, batch_size=args.batch_size,
                      max_steps=args.steps,
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
            "eval_loss": loss, "other_image_loss": other_loss, "fit_error": fit_error,
            "fit_cpu_s": fit_seconds}


def format_table(results: list[dict], subsets=SUBSETS) -> str:
    head = (f"{'variant':<16}{'fusion':<16}{'tokens':>7}{'conn':>6}{'trainable':>11}{'cpu s/step':>11}"
            f"{'wall s':>8}{'loss':>7}{'held-out loss':>14}{'other img':>10}" + "".join(f"{s[:8]:>9}" for s in subsets)
            + f"{'mean':>7}{'other img':>10}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['variant']:<16}{r['fusion']:<16}{r['decoder_tokens']:>7}{r['connector_tokens']:>6}"
                     f"{r['trainable'] / 1e6:>10.2f}M{r['cpu_s_per_step']:>11.2f}{r['wall_s_per_step']:>8.2f}"
                     f"{r['final_loss']:>7.3f}{r['eval_loss']:>14.3f}{r['other_image_loss']:>10.3f}" + "".join(f"{r['accuracy'].get(s, float('nan')):>9.2f}" for s in subsets)
                     + f"{r['accuracy']['mean']:>7.2f}{r['other_image']['mean']:>10.2f}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", choices=("tiny", "smol"), default="tiny")
    p.add_argument("--vision", choices=("profile", "demo"), default="profile",
                   help="the profile's ViT, or the demo's block-pretrained one (assets/vit_demo, 72 px, shuffle 3)")
    p.add_argument("--data", choices=("cauldron", "small_objects"), default="cauldron",
                   help="mini-cauldron's shapes, count and position; or shapes questions on large pictures of small "
                   "objects (vlm_course.data.synthetic.small_objects), where image splitting matters")
    p.add_argument("--subsets", default=",".join(SUBSETS), help="mini-cauldron subsets to train and evaluate on")
    p.add_argument("--large-image-size", type=int, default=144, help="small_objects' picture size")
    p.add_argument("--steps", type=int, default=60, help="optimiser steps per variant")
    p.add_argument("--rows", type=int, default=200, help="training rows per subset")
    p.add_argument("--eval-rows", type=int, default=40, help="held-out rows per subset")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr-lora", type=float, default=1e-3)
    p.add_argument("--lr-projector", type=float, default=2e-3)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, among {VARIANTS}")
    p.add_argument("--lr-fusion", type=float, default=None,
                   help="the cross-attention blocks' rate (default: --lr-projector's)")
    p.add_argument("--fit-words", action="store_true",
                   help="first fit every connector to say each 3 x 3 block's words (needs --vision demo)")
    p.add_argument("--word-scenes", type=int, default=4000, help="fresh scenes for --fit-words")
    p.add_argument("--word-steps", type=int, default=600, help="AdamW steps of 64 for a non-linear connector's fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None, help="keep each variant's checkpoint here (default: a temporary "
                   "folder, removed at the end)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def show(paths: list[str]) -> list[dict]:
    """One table per data set from the --json files of several runs (variants run in parallel, one thread each)."""
    by_data: dict[str, list[dict]] = {}
    subsets_of: dict[str, tuple[str, ...]] = {}
    for path in paths:
        with open(path) as f:
            saved = json.load(f)
        data = saved["args"].get("data", "cauldron")
        if data == "small_objects":
            subsets_of[data] = ("small_objects",)
        else:  # one table per set of subsets trained on
            data = saved["args"].get("subsets", ",".join(SUBSETS))
            subsets_of[data] = tuple(data.split(","))
        for r in saved["results"]:
            by_data.setdefault(data, []).append({**r, "steps": saved["args"]["steps"]})
    for data, results in by_data.items():
        print(f"{data}: {', '.join(sorted({str(r['steps']) for r in results}))} steps")
        print(format_table(results, subsets_of[data]))
        print()
    return [r for results in by_data.values() for r in results]


def main(argv=None) -> list[dict]:
    if argv and argv[0] == "--show":
        return show(argv[1:])
    args = parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}: choose among {VARIANTS}")
    scratch = None
    if args.output_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="design_space-")
        args.output_dir = scratch.name
    if args.data == "small_objects":  # large pictures of small objects: where image splitting matters
        subsets = ("small_objects",)
        train_rows = small_objects(args.rows, seed=0, image_size=args.large_image_size)
        eval_rows = small_objects(args.eval_rows, seed=1, image_size=args.large_image_size)
    else:
        subsets = tuple(s.strip() for s in args.subsets.split(",") if s.strip())
        train_rows = list(load_mini_cauldron("train", subsets, max_per_subset=args.rows, verbose=False))
        eval_rows = list(load_mini_cauldron("test", subsets, max_per_subset=args.eval_rows, verbose=False))
    print(f"profile {args.profile}, {args.steps} steps x batch {args.batch_size}, {len(train_rows)} training rows, "
          f"{len(eval_rows)} held-out rows ({', '.join(subsets)}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    start = time.perf_counter()
    for name in names:
        result = run_variant(name, args, train_rows, eval_rows)
        results.append(result)
        print(f"  {name}: {result['accuracy']['mean']:.2f} held-out, {result['other_image']['mean']:.2f} with another "
              f"image, {result['cpu_s_per_step']:.2f} cpu s/step ({time.perf_counter() - start:.0f} s so far, "
              f"load average {os.getloadavg()[0]:.2f})", flush=True)
    print()
    print(format_table(results, subsets))
    print(f"total {time.perf_counter() - start:.0f} s; load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    if scratch is not None:
        scratch.cleanup()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
