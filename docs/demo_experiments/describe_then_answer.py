"""Experiment: "describe, then answer". The model first writes the demo's dense caption of the image, then
"Answer: X". Section 9 of docs/demo_findings.md shows that SmolLM2 learns count from a *text* description in ~200
QLoRA steps; this asks whether the model's own description can stand in for that text.

    .venv/bin/python docs/demo_experiments/describe_then_answer.py CAPTION_STEPS QA_STEPS [EVAL_N]

Stage 1: captions with LoRA trained too (lr 5e-4; section 8). Stage 2: the mini-cauldron's train questions
(regenerated with their split seed, to know each scene's objects) with the target "<caption> Answer: <answer>".
Scored on the text after the last "Answer:".
"""
import sys, time

import torch

from vlm_course.data import synthetic
from vlm_course.demo import (Batches, DemoRecipe, Stage, build_model, caption, caption_samples, compute_autocast,
                             encode_samples, score, train)
from vlm_course.vlm import answer
from common import generate_with_shapes, threads_from_env

threads_from_env()
cap_steps, qa_steps = int(sys.argv[1]), int(sys.argv[2])
eval_n = int(sys.argv[3]) if len(sys.argv) > 3 else 50
SUBSETS = ("shapes", "count", "spatial", "mc")

def samples(split, per_subset):
    out = []
    for subset in SUBSETS:
        for row, shapes in generate_with_shapes(subset, per_subset, synthetic.SPLIT_SEEDS[split]):
            for turn in row["texts"]:
                out.append({"subset": subset, "image": row["images"][0], "question": turn["user"],
                            "answer": turn["assistant"], "target": f"{caption(shapes, 64)} Answer: {turn['assistant']}"})
    return out


torch.manual_seed(0)
stage1 = Stage("captions", steps=cap_steps, lr_projector=2e-3, lr_vision=2e-4, lr_lora=5e-4, warmup_steps=10,
               data="captions")
stage2 = Stage("describe-answer", steps=qa_steps, lr_projector=2e-4, lr_vision=5e-5, lr_lora=5e-4, warmup_steps=10,
               data="qa")
recipe = DemoRecipe(stages=(stage1, stage2))
model, proc = build_model("smol", recipe)
train_rows = samples("train", 2000)
test = samples("test", eval_n)
test = [s for sub in SUBSETS for s in [x for x in test if x["subset"] == sub][:eval_n]]
print("target example:", train_rows[0]["target"], "|", train_rows[2500]["target"], flush=True)
batches = {
    "captions": Batches(proc, encode_samples(proc, caption_samples(cap_steps * 16, 0)), 16, 0),
    "qa": Batches(proc, encode_samples(proc, [dict(s, answer=s["target"]) for s in train_rows]), 16, 0),
}
t0 = time.time()
train(model, batches, DemoRecipe(stages=(stage1,)), progress=False, log_every=10)
t1 = time.time()
train(model, batches, DemoRecipe(stages=(stage2,)), progress=False, log_every=10)
print(f"captions {t1 - t0:.0f}s, describe-answer {time.time() - t1:.0f}s", flush=True)

model.eval()
correct = {s: [] for s in SUBSETS}
caption_right = {s: [] for s in SUBSETS}
shown = 0
t2 = time.time()
for i in range(0, len(test), 25):
    chunk = test[i:i + 25]
    with torch.no_grad(), compute_autocast(model):
        outs = answer(model, proc, [s["image"] for s in chunk], [s["question"] for s in chunk], max_new_tokens=48)
    for s, out in zip(chunk, outs):
        said = out.rsplit("Answer:", 1)[-1].strip()
        correct[s["subset"]].append(score(s["subset"], said, s["answer"]))
        caption_right[s["subset"]].append(out.split(" Answer:")[0].strip() == s["target"].split(" Answer:")[0])
        if shown < 12 and i % 50 == 0:
            shown += 1
            print(s["subset"], repr(s["question"][:40]), "gold", repr(s["target"]), "->", repr(out), flush=True)
print(f"eval {time.time() - t2:.0f}s", flush=True)
print("after", {k: round(sum(v) / len(v), 3) for k, v in correct.items()}, flush=True)
print("caption exactly right", {k: round(sum(v) / len(v), 3) for k, v in caption_right.items()}, flush=True)
