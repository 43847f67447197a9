"""Experiment: align projector (+ViT) outputs to word embeddings without the LLM, then probe the frozen LLM."""
import os; os.makedirs("runs/experiments", exist_ok=True)
import sys, time, math, numpy as np, torch, torch.nn.functional as F
from vlm_course.config import get_profile
from vlm_course.vlm import VisionLanguageModel, answer
from vlm_course.processing import VLMProcessor
from vlm_course.data import synthetic
from vlm_course.pretrain_vit import random_specs
from vlm_course.demo import load_samples

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 300
BG = sys.argv[2] if len(sys.argv) > 2 else " background"
torch.manual_seed(0)
model = VisionLanguageModel.from_profile(get_profile("smol"))
proc = VLMProcessor.from_config(model.config, system_prompt=None)
tok = proc.tokenizer
E = model.decoder.embed_tokens.weight.detach()
def wid(w):
    ids = tok.encode(w, add_special_tokens=False); assert len(ids) == 1, (w, ids); return ids[0]
colour_vec = {c: E[wid(" " + c)] for c in synthetic.COLOURS}
shape_vec = {s: E[wid(" " + s)] for s in synthetic.SHAPES}
bg_vec = E[wid(BG)]
print("emb rms", E.pow(2).mean().sqrt().item())

def scenes(n, seed):
    rng = np.random.default_rng([seed, 99])
    px, tg = [], []
    for _ in range(n):
        lo = rng.uniform(0.14, 0.26)
        shapes = synthetic.place(rng, random_specs(rng), 64, (lo, lo + 0.12), gap=2.0)
        img = synthetic.render(rng, 64, shapes)
        t = bg_vec.repeat(16, 1).clone(); hit = [False] * 16
        for s in shapes:
            k = min(3, int(s.cy // 16)) * 4 + min(3, int(s.cx // 16))
            v = colour_vec[s.colour] + shape_vec[s.shape]
            t[k] = v if not hit[k] else t[k] + v; hit[k] = True
        px.append(proc.preprocess_images([img])[0]); tg.append(t)
    return torch.stack(px), torch.stack(tg)

t0 = time.time()
X, Y = scenes(12000, 0)
Xv, Yv = scenes(500, 1)
print(f"scenes {time.time()-t0:.0f}s", flush=True)
params = [{"params": model.projector.parameters(), "lr": 2e-3}, {"params": model.vision.parameters(), "lr": 3e-4}]
opt = torch.optim.AdamW(params, weight_decay=0.0)
model.decoder.requires_grad_(False)
bs = 128
g = torch.Generator().manual_seed(0)
t0 = time.time()
for step in range(STEPS):
    f = min(1.0, (step + 1) / 20) * (0.5 * (1 + math.cos(math.pi * step / STEPS)))
    for grp, base in zip(opt.param_groups, (2e-3, 3e-4)): grp["lr"] = base * f
    idx = torch.randint(0, len(X), (bs,), generator=g)
    out = model.encode_images(X[idx])
    loss = F.mse_loss(out, Y[idx]) / Y.pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 50 == 0 or step == STEPS - 1:
        with torch.no_grad():
            ov = model.encode_images(Xv)
            vl = (F.mse_loss(ov, Yv) / Yv.pow(2).mean()).item()
        print(f"step {step} loss {loss.item():.3f} val {vl:.3f} {time.time()-t0:.0f}s", flush=True)
torch.save({"projector": model.projector.state_dict(), "vision": model.vision.state_dict()}, f"runs/experiments/align_{STEPS}.pt")
# zero-shot probe, frozen LLM
model.eval()
for subset in ["shapes", "count", "spatial"]:
    s = load_samples("test", [subset], 40)[:40]
    with torch.no_grad():
        preds = answer(model, proc, [x["image"] for x in s], [x["question"] + " Answer with one word." for x in s], max_new_tokens=6)
    ok = sum(p.strip().lower().rstrip(".") == x["answer"] for p, x in zip(preds, s))
    print(subset, ok, "/", len(s), [(x["question"][:30], x["answer"], p) for p, x in list(zip(preds, s))[:6]], flush=True)
