"""Pretrain the demo's ViT (72 px, 8 px patches, 3 x 3 blocks) with per-block heads: experiment script.

    .venv/bin/python docs/demo_experiments/vit_blocks.py STEPS [LR] [INIT]     INIT: smol (default) or scratch

Per block of the pixel-shuffled grid (the features the projector reads): the colour and the shape of the object
whose centre lies in the block, or none. Prints held-out block accuracy every 100 steps.
"""
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from vlm_course.config import VisionConfig
from vlm_course.pretrain_blocks import BlockHeads, block_accuracy, make_dataset
from vlm_course.processing import ImageTransform
from vlm_course.vision import VisionEncoder

STEPS = int(sys.argv[1])
LR = float(sys.argv[2]) if len(sys.argv) > 2 else 1e-3
INIT = sys.argv[3] if len(sys.argv) > 3 else "smol"
torch.manual_seed(0)
SIDE, R = 3, 3


if INIT == "smol":
    encoder = VisionEncoder.from_siglip("course-vit-smol").resized(72)
else:
    encoder = VisionEncoder(VisionConfig(image_size=72, patch_size=8, hidden_size=192, intermediate_size=768,
                                         num_layers=4, num_heads=3))
cfg = encoder.cfg
transform = ImageTransform(cfg)
t0 = time.perf_counter()
train = make_dataset(min(STEPS * 128, 40_000), 0, transform, SIDE, progress=False)
held = make_dataset(1000, 1, transform, SIDE, progress=False)
print(f"drawn in {time.perf_counter() - t0:.0f} s", flush=True)
heads = BlockHeads(cfg.hidden_size, R)
params = list(encoder.parameters()) + list(heads.parameters())
opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.05, betas=(0.9, 0.98))


n = len(train["pixels"])
t0 = time.perf_counter()
for step in range(STEPS):
    lr = LR * min(1, (step + 1) / 30) * 0.5 * (1 + np.cos(np.pi * step / STEPS))
    for g in opt.param_groups:
        g["lr"] = lr
    idx = torch.randint(0, n, (128,))
    c, s = heads(encoder(train["pixels"][idx].float()))
    loss = F.cross_entropy(c.flatten(0, 1), train["colour"][idx].flatten()) + F.cross_entropy(
        s.flatten(0, 1), train["shape"][idx].flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if (step + 1) % 100 == 0 or step == 0:
        accuracy = block_accuracy(encoder, heads, held)
        print(f"step {step + 1} loss {loss.item():.3f} {time.perf_counter() - t0:.0f} s | held-out {accuracy}", flush=True)
torch.save({"encoder": encoder.state_dict()}, f"runs/experiments/vit_blocks_{STEPS}_{INIT}.pt")
