"""Zero-shot: can the frozen SmolLM2-135M answer the mini-cauldron questions from a perfect text description?"""
from vlm_course.weights import load_smollm2
from common import generate_with_shapes
from vlm_course.demo import caption
dec, tok = load_smollm2()
for subset in ["shapes", "count", "spatial"]:
    ok = 0; ex = []
    for row, shapes in generate_with_shapes(subset, 40, 123):
        t = row["texts"][0]
        desc = caption(shapes, 64)
        msgs = [{"role": "user", "content": f"Image: {desc}\n{t['user']} Answer with one word."}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        out = dec.generate(ids, max_new_tokens=8, eos_token_id=tok.eos_token_id)
        p = tok.decode(out[0], skip_special_tokens=True).strip().lower().rstrip(".")
        ok += (p == t["assistant"]); ex.append((desc[:60], t["user"][:40], t["assistant"], p))
    print(subset, ok, "/ 40", ex[:4], flush=True)
