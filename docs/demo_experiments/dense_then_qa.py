"""Experiment: a first stage whose every supervised token depends on the image, with the decoder's LoRA trained too,
then QLoRA on the mini-cauldron. Compares two stage-1 data kinds:

  captions  the demo's dense captions ("3 objects: red circle top left, ...")
  dense     multi-turn conversations about one fresh scene: several mini-cauldron-style questions per image
            (colour, shape, counts, relations, sometimes with lettered options), answers supervised, so one
            sequence carries ~4 answers for one image's 16 tokens (a single-turn sample carries one)

    .venv/bin/python docs/demo_experiments/dense_then_qa.py KIND STAGE1_STEPS QA_STEPS STAGE1_LORA_LR [EVAL_N] [QAS]

Prints the image-dependence check after each stage, per-stage times and held-out accuracy at the end.
Set OMP_NUM_THREADS / torch threads with THREADS=1 to run two experiments side by side.
"""
import os, sys, time
from collections import Counter

import numpy as np
import torch

from vlm_course.data import synthetic
from vlm_course.demo import (Batches, DemoRecipe, Stage, build_model, caption_samples, encode_samples, evaluate, load_samples, train, training_batches)
from vlm_course.pretrain_vit import random_specs
from common import image_dependence, threads_from_env

threads_from_env()
os.makedirs("runs/experiments", exist_ok=True)
kind, s1_steps, qa_steps, s1_lora = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
eval_n = int(sys.argv[5]) if len(sys.argv) > 5 else 50
qas_per_image = int(sys.argv[6]) if len(sys.argv) > 6 else 4


def _ask(rng, templates, **kw):
    return str(templates[int(rng.integers(len(templates)))]).format(**kw)


def scene_questions(rng, shapes):
    """Every unambiguous mini-cauldron-style question about a scene, as (question, answer, pool-for-mc)."""
    by_shape, by_colour = Counter(s.shape for s in shapes), Counter(s.colour for s in shapes)
    by_pair = Counter((s.colour, s.shape) for s in shapes)
    out = []
    for s in shapes:
        if by_shape[s.shape] == 1:
            out.append((_ask(rng, synthetic.COLOUR_QUESTIONS, shape=s.shape), s.colour, synthetic.COLOURS))
        if by_colour[s.colour] == 1:
            out.append((_ask(rng, synthetic.SHAPE_QUESTIONS, colour=s.colour), s.shape, synthetic.SHAPES))
    counts = [str(k) for k in range(1, synthetic.MAX_COUNT + 1)]
    shape = str(rng.choice(sorted(by_shape)))
    out.append((_ask(rng, synthetic.COUNT_QUESTIONS["shape"], shape=shape), str(by_shape[shape]), counts))
    colour = str(rng.choice(sorted(by_colour)))
    out.append((_ask(rng, synthetic.COUNT_QUESTIONS["colour"], colour=colour), str(by_colour[colour]), counts))
    out.append((_ask(rng, synthetic.COUNT_QUESTIONS["total"]), str(len(shapes)), counts))
    unique = [s for s in shapes if by_pair[(s.colour, s.shape)] == 1]
    for a in unique:
        for b in unique:
            if a is b:
                continue
            for rel in synthetic.RELATIONS:
                answer = "yes" if synthetic.holds(rel, a, b) else "no" if synthetic.holds(synthetic.OPPOSITE[rel], a, b) else None
                if answer:
                    phrase = _ask(rng, synthetic.RELATION_PHRASES[rel])
                    q = _ask(rng, synthetic.SPATIAL_QUESTIONS, a=f"{a.colour} {a.shape}", rel=phrase,
                             b=f"{b.colour} {b.shape}")
                    out.append((q, answer, None))
    return out


def dense_samples(n, seed, image_size=64):
    rng = np.random.default_rng([seed, 11])
    samples = []
    for _ in range(n):
        lo = rng.uniform(0.14, 0.24)
        shapes = synthetic.place(rng, random_specs(rng), image_size, (lo, lo + 0.12), gap=2.0)
        questions = scene_questions(rng, shapes)
        # Spatial questions are many per pair: keep at most half of the picks for them.
        spatial = [q for q in questions if q[2] is None]
        other = [q for q in questions if q[2] is not None]
        picks = [other[j] for j in rng.permutation(len(other))][: qas_per_image - min(len(spatial), qas_per_image // 2)]
        picks += [spatial[j] for j in rng.permutation(len(spatial))][: qas_per_image - len(picks)]
        picks = [picks[j] for j in rng.permutation(len(picks))]
        turns = []
        for q, a, pool in picks:
            if pool is not None and rng.random() < 0.25:
                letter = synthetic.LETTERS[int(rng.integers(4))]
                q, a = synthetic.with_options(rng, q, a, list(pool), letter), letter
            turns.append({"user": q, "assistant": a})
        samples.append({"image": synthetic.render(rng, image_size, shapes), "turns": turns})
    return samples


torch.manual_seed(0)
stage1 = Stage(kind, steps=s1_steps, lr_projector=2e-3, lr_vision=2e-4, lr_lora=s1_lora, warmup_steps=10,
               data=kind)
qa_stage = Stage("qlora", steps=qa_steps, lr_projector=2e-4, lr_vision=5e-5, lr_lora=5e-4, warmup_steps=10)
recipe = DemoRecipe(stages=(stage1, qa_stage))
model, proc = build_model("smol", recipe)
train_samples = load_samples("train", recipe.subsets, recipe.train_per_subset)
test = load_samples("test", recipe.subsets, eval_n)
test = [s for sub in recipe.subsets for s in [x for x in test if x["subset"] == sub][:eval_n]]
batches = training_batches(proc, encode_samples(proc, train_samples), DemoRecipe(stages=(qa_stage,)))
if kind == "captions":
    batches["captions"] = Batches(proc, encode_samples(proc, caption_samples(s1_steps * 16, 0)), 16, 0)
else:
    dense = dense_samples(s1_steps * 16, 0)
    print("dense example:", dense[0]["turns"], flush=True)
    encoded = []
    for s in dense:
        enc = proc.encode_conversation(s["turns"], [s["image"]])
        enc["pixel_values"] = enc["pixel_values"].half()
        encoded.append(enc)
    print("dense tokens per sequence:", sum(len(e["input_ids"]) for e in encoded) / len(encoded), flush=True)
    batches["dense"] = Batches(proc, encoded, 16, 0)
held_out = {}
for sub in recipe.subsets:
    held_out[sub] = encode_samples(proc, [s for s in test if s["subset"] == sub][:32])


t0 = time.time()
hist = train(model, batches, DemoRecipe(stages=(stage1,)), progress=False, log_every=10)
s1_seconds = time.time() - t0
print(f"stage 1 ({kind}) {s1_seconds:.0f}s", flush=True)
image_dependence(model, proc, held_out, f"after {kind}")
acc, _ = evaluate(model, proc, test, 50, 4, progress=False)
print(f"after {kind}", {k: round(v, 3) for k, v in acc.items()}, flush=True)
t1 = time.time()
if qa_steps:
    hist += train(model, batches, DemoRecipe(stages=(qa_stage,)), progress=False, log_every=10)
print(f"qa stage {time.time() - t1:.0f}s; training {time.time() - t1 + s1_seconds:.0f}s", flush=True)
image_dependence(model, proc, held_out, "after qa")
acc, recs = evaluate(model, proc, test, 50, 4, progress=False)
print("after", {k: round(v, 3) for k, v in acc.items()}, flush=True)
for r in recs[::12][:16]:
    print(r["subset"], repr(r["question"][:50]), r["answer"], "->", repr(r["prediction"]))
