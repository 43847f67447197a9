"""Reading and pointing (lesson 09): one vision branch against two (Vary-toy's high-resolution second branch).

    .venv/bin/python docs/demo_experiments/reading_and_pointing.py --variant single --out runs/reading
    .venv/bin/python docs/demo_experiments/reading_and_pointing.py --variant dual --out runs/reading
    .venv/bin/python docs/demo_experiments/reading_and_pointing.py --variant dual --time-steps 3   # seconds per step
    .venv/bin/python docs/demo_experiments/reading_and_pointing.py --profile tiny --steps 2 --train-per-task 4 \\
        --eval-per-task 2 --variant dual --out /tmp/reading                                          # smoke run
    .venv/bin/python docs/demo_experiments/reading_and_pointing.py --variant dual --vision-stage-steps 120 \
        --out runs/reading                                          # Vary's first stage, then the same QLoRA run

Both variants train the same recipe for the same steps on the same 128 px rows; they differ only in the image side:

    single  the profile's ViT (smol: the course ViT, 64 px, 8 px patches) -> 16 tokens per image
    dual    the same, plus a second branch (`vlm_course.dual_vision`): the same ViT resized to 128 px (its position
            embeddings resampled), its own projector, pixel shuffle 4 -> 16 more tokens

Training data (multi-task, Vary-toy's prompts, `vlm_course.data.reading`): words in small print (`small_print`, seed 0),
grounding scenes with the detection prompt, and the mini-cauldron's shapes and position questions, all drawn at
128 px by the generator (seed 0). The decoder trains with QLoRA as in the demo (`demo.train_config`'s settings),
the ViTs and projectors fully. Held out (seed 1): OCR scored by ANLS, grounding by Acc@0.5 and mean IoU, each with the
right image and with another scene's (`with_other_images`). Writes <out>/<variant>.json and prints it.

With --vision-stage-steps N (dual only), Vary's first stage runs before the QLoRA stage
(`vlm_course.vision_vocabulary`): the second branch alone learns to emit the decoder's own word embeddings (an OCR
picture's tokens are its answer's token ids, a scene's blocks the colour word of the object centred there), its
projector is then solved by least squares, and the branch stays frozen in the QLoRA stage, as Vary freezes its new
vocabulary. The run is written as <variant>-vocab.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from vlm_course.config import HighResConfig
from vlm_course.data import reading, synthetic
from vlm_course.dual_vision import add_high_res_branch, token_budget
from vlm_course.evaluation import accuracy_at_iou, anls, evaluate, mean_iou, with_other_images
from vlm_course.processing import VLMProcessor
from vlm_course.training import TrainConfig, Trainer
from vlm_course.vision_vocabulary import VocabularyConfig, train_vision_vocabulary
from vlm_course.vlm import VisionLanguageModel

IMAGE_SIZE = 128  # every picture is drawn at the high-resolution branch's size; the single branch sees it shrunk
OTHER_TASKS = ("shapes", "position")  # existing subsets trained beside ocr and grounding (multi-task)


def build_model(profile: str, variant: str):
    model = VisionLanguageModel.from_profile(profile)
    if variant == "dual":
        vision = dataclasses.replace(model.vision.cfg, image_size=IMAGE_SIZE)
        add_high_res_branch(model, HighResConfig(vision=vision, shuffle_factor=4), init="copy")
    return model, VLMProcessor.from_config(model.config, system_prompt=None)


def task_rows(split_seed: int, ocr: int, grounding: int, other: int) -> list[dict]:
    """OCR in small print, grounding with the detection prompt, the other subsets as they are; all at 128 px."""
    rows = reading.small_print(ocr, seed=split_seed, image_size=IMAGE_SIZE)
    rows += [reading.with_task_prompt(r, "grounding")
             for r in synthetic.generate("grounding", grounding, seed=split_seed, image_size=IMAGE_SIZE)]
    for subset in OTHER_TASKS:
        rows += [{**r, "source": subset, "texts": r["texts"][:1]}
                 for r in synthetic.generate(subset, other, seed=split_seed, image_size=IMAGE_SIZE)]
    return rows


def train_config(args, output_dir) -> TrainConfig:
    """The demo's QLoRA settings (demo.train_config), with the vision side trained too."""
    return TrainConfig(
        vision="full", projector="full", decoder="qlora", lora_r=16, lora_alpha=32, lora_dropout=0.0,
        double_quant=False, frozen_dtype="compute", precision="auto", lr_projector=args.lr_projector,
        lr_vision=args.lr_vision, lr_lora=args.lr_lora, weight_decay=0.0, adam_betas=(0.9, 0.95), min_lr_ratio=0.1,
        warmup_fraction=0.05, max_grad_norm=1.0, batch_size=args.batch_size, max_steps=args.steps, group_by_length=8,
        seed=0, output_dir=str(output_dir), progress=args.progress, log_every=args.log_every)


def scores(model, processor, rows, batch_size: int) -> dict:
    """ANLS on the OCR rows, Acc@0.5 and mean IoU on the grounding rows (strict parse_box, and lenient read_box)."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16,
                              enabled=model.decoder.embed_tokens.weight.dtype == torch.bfloat16)
    with autocast:
        result = evaluate(model, processor, rows, batch_size=batch_size, progress=False)
    by_task: dict[str, list] = {}
    for row, record in zip(rows, result.records):
        by_task.setdefault(row["source"], []).append((record.prediction, row["texts"][0]["assistant"]))
    out = {}
    if "ocr" in by_task:
        out["ocr_anls"] = sum(anls(p, [g]) for p, g in by_task["ocr"]) / len(by_task["ocr"])
    if "grounding" in by_task:
        predictions, golds = zip(*by_task["grounding"])
        out["grounding_acc50"] = accuracy_at_iou(predictions, golds)
        out["grounding_mean_iou"] = mean_iou(predictions, golds)
        out["grounding_acc50_lenient"] = accuracy_at_iou(predictions, golds, lenient=True)
    out["examples"] = {task: pairs[:4] for task, pairs in by_task.items()}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=("single", "dual"), required=True)
    parser.add_argument("--profile", default=os.environ.get("VLM_COURSE_PROFILE", "smol"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-per-task", type=int, default=1200, help="ocr and grounding rows (others: half)")
    parser.add_argument("--eval-per-task", type=int, default=100)
    parser.add_argument("--eval-batch-size", type=int, default=50)
    parser.add_argument("--lr-lora", type=float, default=1e-3)
    parser.add_argument("--lr-projector", type=float, default=2e-3)
    parser.add_argument("--lr-vision", type=float, default=3e-4)
    parser.add_argument("--time-steps", type=int, default=0, help="> 0: train this many steps, print s/step, stop")
    parser.add_argument("--out", default="runs/reading")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--vision-stage-steps", type=int, default=0,
                        help="> 0 (dual only): Vary's vision-vocabulary stage first, this many steps")
    parser.add_argument("--vision-stage-batch-size", type=int, default=VocabularyConfig.batch_size)
    parser.add_argument("--vision-stage-ocr", type=int, default=VocabularyConfig.ocr_images)
    parser.add_argument("--vision-stage-scenes", type=int, default=VocabularyConfig.scene_images)
    parser.add_argument("--vision-stage-held-out", type=int, default=VocabularyConfig.held_out)
    args = parser.parse_args(argv)
    if args.vision_stage_steps and args.variant != "dual":
        parser.error("--vision-stage-steps trains the second branch: use it with --variant dual")
    name = args.variant + ("-vocab" if args.vision_stage_steps else "")
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model, processor = build_model(args.profile, args.variant)
    n = args.train_per_task
    train_rows = task_rows(0, n, n, n // 2)
    test_rows = task_rows(1, args.eval_per_task, args.eval_per_task, 0)
    if args.time_steps:
        args.steps = args.time_steps
    stage = None
    if args.vision_stage_steps:
        stage_cfg = VocabularyConfig(steps=args.vision_stage_steps, batch_size=args.vision_stage_batch_size,
                                     ocr_images=args.vision_stage_ocr, scene_images=args.vision_stage_scenes,
                                     held_out=args.vision_stage_held_out)
        stage = train_vision_vocabulary(model, processor, stage_cfg, log_every=args.log_every)
        print(json.dumps({k: v for k, v in stage.items() if k != "loss_history"}), flush=True)
    cfg = train_config(args, out / f"train-{name}")
    trainer = Trainer(model, processor, train_rows, cfg)
    if stage is not None:
        # the learnt vocabulary stays as it is (Vary freezes it): without a gradient AdamW leaves these weights alone
        for p in [*model.vision.high.parameters(), *model.projector.high.parameters()]:
            p.requires_grad_(False)
    load = os.getloadavg()
    t0, cpu0 = time.perf_counter(), time.process_time()
    trainer.fit()
    train_seconds = time.perf_counter() - t0
    # CPU seconds of this process: on a shared machine the wall time stretches, this does not (much)
    train_cpu_seconds = time.process_time() - cpu0
    seconds = [r["seconds"] for r in trainer.history["train"]]
    report = {"variant": name, "profile": args.profile, "steps": args.steps, "batch_size": args.batch_size,
              "train_rows": len(train_rows), "token_budget": token_budget(model.config),
              "train_seconds": round(train_seconds, 1), "seconds_per_step": round(train_seconds / max(1, args.steps), 2),
              "train_cpu_seconds": round(train_cpu_seconds, 1),
              "cpu_seconds_per_step": round(train_cpu_seconds / max(1, args.steps), 2),
              "threads": torch.get_num_threads(), "load_average_at_start": [round(x, 2) for x in load],
              "final_loss": trainer.history["train"][-1]["loss"] if seconds else None}
    if args.variant == "dual":  # what the QLoRA stage trained of the second branch (0 after the vision stage)
        report["high_branch_trainable"] = sum(p.numel() for m in (model.vision.high, model.projector.high)
                                              for p in m.parameters() if p.requires_grad)
    if stage is not None:
        report["vision_stage"] = {**vars(stage_cfg), **stage}
    if not args.time_steps:
        model.eval()
        right = scores(model, processor, test_rows, args.eval_batch_size)
        other = scores(model, processor, with_other_images(test_rows), args.eval_batch_size)
        report.update({"right_image": right, "other_image": other, "eval_rows": len(test_rows),
                       "loss_curve": [round(r["loss"], 4) for r in trainer.history["train"]]})
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "loss_curve"}, indent=1))
    return report


if __name__ == "__main__":
    main()
