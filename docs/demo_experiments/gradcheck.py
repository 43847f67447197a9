import torch
from vlm_course.demo import DemoRecipe, build_model, load_samples, encode_samples, collate
from vlm_course.config import get_profile
from vlm_course.vlm import VisionLanguageModel
from vlm_course.training import answer_loss_sum
torch.manual_seed(0)
q, proc = build_model("smol", DemoRecipe())
f = VisionLanguageModel.from_profile(get_profile("smol"))
f.config.image_token_id = q.config.image_token_id
sd = torch.load("runs/experiments/align_300.pt", weights_only=True)
for m in (q, f):
    m.projector.load_state_dict(sd["projector"]); m.vision.load_state_dict(sd["vision"])
s = load_samples("test", ["shapes"], 16)[:16]
b = collate(proc, encode_samples(proc, s))
def g(m, autocast):
    emb = m.embed(b["input_ids"], b["pixel_values"]).detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = m.decoder(inputs_embeds=emb, attention_mask=b["attention_mask"])
        logits = out.logits[:, :-1].float()
    tg = b["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tg.reshape(-1), ignore_index=-100)
    loss.backward()
    img = (b["input_ids"] == m.image_token_id)
    return loss.item(), emb.grad[img].float()
lq, gq = g(q, True)
lf, gf = g(f, False)
lf2, gf2 = g(f, True)
cos = lambda a, c: torch.nn.functional.cosine_similarity(a.flatten(), c.flatten(), dim=0).item()
print("loss 4bit-bf16", lq, "fp32", lf, "fp32-bf16", lf2)
print("grad norms", gq.norm().item(), gf.norm().item(), gf2.norm().item())
print("cos(4bit, fp32)", cos(gq, gf), "cos(fp32 bf16, fp32)", cos(gf2, gf))
import bitsandbytes as bnb
fm = dict(f.decoder.named_modules())
n = 0
for name, mod in q.decoder.named_modules():
    if isinstance(mod, bnb.nn.Linear4bit):
        key = name.replace(".base_layer", "")
        w = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
        fm[key].weight.data.copy_(w); n += 1
print("copied", n)
lf3, gf3 = g(f, False)
print("fp32 with dequantised NF4 weights: loss", lf3, "cos(4bit, deq-fp32)", cos(gq, gf3), "cos(deq, fp32)", cos(gf3, gf))
