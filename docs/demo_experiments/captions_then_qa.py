"""Experiment: LLaVA's two stages. Captions with the decoder frozen (projector + ViT learn to describe the image),
then QLoRA on the mini-cauldron. Prints the image-dependence check (loss with the right image vs another sample's)
after each stage and held-out accuracy at the end.

    .venv/bin/python docs/demo_experiments/captions_then_qa.py CAPTION_STEPS QA_STEPS [LR_LORA] [EVAL_N] [counts]

"counts": captions that also state the count per shape and per colour ("5 objects; circles 2, squares 3; red 1,
blue 4: red circle top left, ..."), so that the caption stage asks the image tokens for those counts too.
"""
import os, sys, time, torch
from collections import Counter
from vlm_course import demo
from vlm_course.demo import (DemoRecipe, Stage, build_model, caption_samples, encode_samples,
                             evaluate, load_samples, train, training_batches)
from common import image_dependence

os.makedirs("runs/experiments", exist_ok=True)
cap_steps, qa_steps = int(sys.argv[1]), int(sys.argv[2])
lr_lora = float(sys.argv[3]) if len(sys.argv) > 3 else 5e-4
eval_n = int(sys.argv[4]) if len(sys.argv) > 4 else 50
if len(sys.argv) > 5 and sys.argv[5] == "counts":
    plain_caption = demo.caption

    def caption_with_counts(shapes, image_size):
        head, objects = plain_caption(shapes, image_size).split(": ", 1)
        shapes_n = ", ".join(f"{k}s {v}" for k, v in sorted(Counter(s.shape for s in shapes).items()))
        colours_n = ", ".join(f"{k} {v}" for k, v in sorted(Counter(s.colour for s in shapes).items()))
        return f"{head}; {shapes_n}; {colours_n}: {objects}"

    demo.caption = caption_with_counts
    print("caption example:", demo.caption_samples(1, 5)[0]["answer"], flush=True)
torch.manual_seed(0)
caption_stage = Stage("captions", steps=cap_steps, lr_projector=2e-3, lr_vision=2e-4, lr_lora=0.0,
                      warmup_steps=10, data="captions")
qa_stage = Stage("qlora", steps=qa_steps, lr_projector=2e-4, lr_vision=5e-5, lr_lora=lr_lora, warmup_steps=10)
recipe = DemoRecipe(stages=(caption_stage, qa_stage))
model, proc = build_model("smol", recipe)
train_samples = load_samples("train", recipe.subsets, recipe.train_per_subset)
test = load_samples("test", recipe.subsets, eval_n)
test = [s for sub in recipe.subsets for s in [x for x in test if x["subset"] == sub][:eval_n]]
batches = training_batches(proc, encode_samples(proc, train_samples), recipe)
# Held-out sets for the image-dependence check, encoded once: 48 fresh captions and 32 questions per subset.
held_out = {"captions": encode_samples(proc, caption_samples(48, seed=999))}
for sub in recipe.subsets:
    held_out[sub] = encode_samples(proc, [s for s in test if s["subset"] == sub][:32])


t0 = time.time()
hist = train(model, batches, DemoRecipe(stages=(caption_stage,)), progress=False, log_every=10)
print(f"caption stage {time.time() - t0:.0f}s", flush=True)
image_dependence(model, proc, held_out, "after captions")
t1 = time.time()
hist += train(model, batches, DemoRecipe(stages=(qa_stage,)), progress=False, log_every=10)
print(f"qa stage {time.time() - t1:.0f}s; training {time.time() - t0:.0f}s", flush=True)
image_dependence(model, proc, held_out, "after qa")
acc, recs = evaluate(model, proc, test, 50, 4, progress=False)
print("after", {k: round(v, 3) for k, v in acc.items()}, flush=True)
for r in recs[::12][:16]:
    print(r["subset"], repr(r["question"][:50]), r["answer"], "->", repr(r["prediction"]))
torch.save({"projector": model.projector.state_dict(), "vision": model.vision.state_dict(),
            "history": hist}, f"runs/experiments/captions_{cap_steps}_qa_{qa_steps}{sys.argv[5] if len(sys.argv) > 5 else ''}.pt")
