import torch, random
from vlm_course.demo_panel import load_demo_checkpoint
from vlm_course.demo import load_samples, encode_samples, collate, compute_autocast
from vlm_course.training import answer_loss_sum
torch.manual_seed(0)
model, proc = load_demo_checkpoint()
for subset in ["shapes", "count", "spatial", "mc"]:
    s = load_samples("test", [subset], 48)[:48]
    enc = encode_samples(proc, s)
    b = collate(proc, enc)
    with torch.no_grad(), compute_autocast(model):
        l, n = answer_loss_sum(model, b)
        b2 = dict(b); b2["pixel_values"] = b["pixel_values"].roll(1, 0)
        l2, n2 = answer_loss_sum(model, b2)
        b3 = dict(b); b3["pixel_values"] = torch.zeros_like(b["pixel_values"])
        l3, _ = answer_loss_sum(model, b3)
    print(subset, "true", (l/n).item(), "rolled", (l2/n2).item(), "blank", (l3/n).item(), flush=True)
