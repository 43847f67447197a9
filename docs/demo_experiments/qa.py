"""Experiment: QLoRA QA training from the word-aligned projector/ViT. args: align_ckpt steps lr_lora lr_proj lr_vit [eval_n]"""
import os; os.makedirs("runs/experiments", exist_ok=True)
import sys, time, json, torch
from vlm_course import demo
from vlm_course.demo import DemoRecipe, Stage, build_model, load_samples, encode_samples, training_batches, train, evaluate
ckpt, steps, lr_lora, lr_proj, lr_vit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
eval_n = int(sys.argv[6]) if len(sys.argv) > 6 else 50
torch.manual_seed(0)
recipe = DemoRecipe(stages=(Stage("qlora", steps=steps, lr_projector=lr_proj, lr_vision=lr_vit, lr_lora=lr_lora, warmup_steps=max(1, steps // 10)),))
model, proc = build_model("smol", recipe)
if ckpt != "none":
    sd = torch.load(ckpt, weights_only=True)
    model.projector.load_state_dict(sd["projector"]); model.vision.load_state_dict(sd["vision"])
train_samples = load_samples("train", recipe.subsets, recipe.train_per_subset)
test = load_samples("test", recipe.subsets, eval_n)
test = [s for sub in recipe.subsets for s in [x for x in test if x["subset"] == sub][:eval_n]]
enc = encode_samples(proc, train_samples)
t0 = time.time()
hist = train(model, training_batches(proc, enc, recipe), recipe, progress=False, log_every=10)
print(f"train {time.time()-t0:.0f}s", flush=True)
acc, recs = evaluate(model, proc, test, 50, 4, progress=False)
print("after", {k: round(v, 3) for k, v in acc.items()}, flush=True)
for r in recs[::12][:16]:
    print(r["subset"], repr(r["question"][:50]), r["answer"], "->", repr(r["prediction"]))
torch.save({"projector": model.projector.state_dict(), "vision": model.vision.state_dict(),
            "lora": {n: p for n, p in model.decoder.named_parameters() if "lora_" in n}}, f"runs/experiments/qa_{steps}.pt")
