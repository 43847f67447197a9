"""Text oracle: QLoRA on SmolLM2 with a perfect text description instead of the image. How fast does it learn?

    .venv/bin/python docs/demo_experiments/oracle_lora.py STEPS LR [EVAL_EVERY] [OPTIONS]

OPTIONS, comma-separated: "nosys" leaves out SmolLM2's default system prompt (as the demo does: 20 tokens
shorter); "fine" gives each object's position as x and y on a 0-9 scale ("red circle at x 2 y 7") instead of
the demo caption's 3 x 3 grid words, so that every spatial question is decidable from the text.
"""
import sys, time, math, random, torch, torch.nn.functional as F
from common import generate_with_shapes, threads_from_env
from vlm_course.demo import caption, DemoRecipe, build_model, lora_parameters, compute_autocast
from vlm_course.evaluation import mmstar_match, normalize_answer
STEPS = int(sys.argv[1]); LR = float(sys.argv[2]); EVAL_EVERY = int(sys.argv[3]) if len(sys.argv) > 3 else STEPS
OPTIONS = sys.argv[4].split(",") if len(sys.argv) > 4 else []
threads_from_env()


def describe(shapes):
    if "fine" not in OPTIONS:
        return caption(shapes, 64)
    ordered = sorted(shapes, key=lambda s: (s.cy, s.cx))
    parts = [f"{s.colour} {s.shape} at x {min(9, int(s.cx * 10 / 64))} y {min(9, int(s.cy * 10 / 64))}" for s in ordered]
    return f"{len(shapes)} object{'s' * (len(shapes) > 1)}: " + ", ".join(parts) + "."
torch.manual_seed(0)
model, proc = build_model("smol", DemoRecipe())
tok = proc.tokenizer
def rows(subset, n, seed):
    out = []
    for row, shapes in generate_with_shapes(subset, n, seed):
        t = row["texts"][0]
        out.append((subset, f"Image: {describe(shapes)}\n{t['user']}", t["assistant"]))
    return out
subsets = ["shapes", "count", "spatial", "mc"]
train = [r for s in subsets for r in rows(s, 600, 11)]
test = [r for s in subsets for r in rows(s, 40, 12)]
def enc(q, a=None):
    if "nosys" in OPTIONS:  # the demo's format: no system turn
        text = f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" + (f"{a}<|im_end|>" if a else "")
        return tok.encode(text, add_special_tokens=False)
    msgs = [{"role": "user", "content": q}] + ([{"role": "assistant", "content": a}] if a else [])
    return tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=a is None, tokenize=False), add_special_tokens=False)
random.seed(0)
lora = lora_parameters(model)
for p in lora: p.requires_grad_(True)
opt = torch.optim.AdamW(lora, lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
def evaluate(step):
    model.eval(); acc = {}
    for s in subsets:
        ok = 0
        for sub, q, a in [r for r in test if r[0] == s]:
            ids = torch.tensor([enc(q)])
            with torch.no_grad(), compute_autocast(model):
                out = model.decoder.generate(ids, max_new_tokens=4, eos_token_id=tok.eos_token_id)
            p = tok.decode(out[0], skip_special_tokens=True)
            ok += mmstar_match(p, a) if s == "mc" else float(normalize_answer(p) == normalize_answer(a))
        acc[s] = ok / 40
    print("oracle after", step, acc, flush=True); model.train()
t0 = time.time()
for step in range(STEPS):
    f = min(1, (step + 1) / 10) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / STEPS)))
    for g in opt.param_groups: g["lr"] = LR * f
    batch = random.sample(train, 16)
    seqs, labs = [], []
    for _, q, a in batch:
        p_ids = enc(q); full = enc(q, a)
        full = full[:-1] if tok.decode(full[-1:]) == "\n" else full
        seqs.append(full); labs.append([-100] * len(p_ids) + full[len(p_ids):])
    L = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (L - len(s)) for s in seqs]); lab = torch.tensor([l + [-100] * (L - len(l)) for l in labs])
    mask = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
    with compute_autocast(model):
        logits = model.decoder(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1), ignore_index=-100)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(lora, 1.0); opt.step()
    if step % 10 == 0: print(f"step {step} loss {loss.item():.3f} {time.time()-t0:.0f}s", flush=True)
    if (step + 1) % EVAL_EVERY == 0: evaluate(step + 1)
