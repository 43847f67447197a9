"""Pretrain the demo's ViT (72 px, 8 px patches, 3 x 3 blocks) with per-block heads: experiment script.

    .venv/bin/python docs/demo_experiments/vit_blocks.py STEPS [LR] [INIT]     INIT: smol (default) or scratch

Per block of the pixel-shuffled grid (the features the projector reads): the colour and the shape of the object
whose centre lies in the block, or none. Prints held-out block accuracy every 100 steps.
"""
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vlm_course.config import VisionConfig
from vlm_course.data import synthetic
from vlm_course.pretrain_vit import random_specs
from vlm_course.processing import ImageTransform
from vlm_course.projector import pixel_shuffle
from vlm_course.vision import VisionEncoder

STEPS = int(sys.argv[1])
LR = float(sys.argv[2]) if len(sys.argv) > 2 else 1e-3
INIT = sys.argv[3] if len(sys.argv) > 3 else "smol"
torch.manual_seed(0)
SIDE, R = 3, 3


def block_labels(shapes, image_size=64):
    colour, shape = np.zeros(SIDE * SIDE, np.int64), np.zeros(SIDE * SIDE, np.int64)
    taken = set()
    for s in sorted(shapes, key=lambda s: -s.size):
        cell = min(SIDE - 1, int(s.cy * SIDE / image_size)) * SIDE + min(SIDE - 1, int(s.cx * SIDE / image_size))
        if cell in taken:
            continue
        taken.add(cell)
        colour[cell], shape[cell] = 1 + synthetic.COLOURS.index(s.colour), 1 + synthetic.SHAPES.index(s.shape)
    return colour, shape


def dataset(n, seed, transform):
    rng = np.random.default_rng([seed, 5])
    px, col, shp = [], [], []
    for _ in range(n):
        lo = rng.uniform(0.14, 0.24)
        shapes = synthetic.place(rng, random_specs(rng), 64, (lo, lo + 0.12), gap=2.0)
        px.append(transform(synthetic.render(rng, 64, shapes)).half())
        c, s = block_labels(shapes)
        col.append(c)
        shp.append(s)
    return torch.stack(px), torch.from_numpy(np.stack(col)), torch.from_numpy(np.stack(shp))


if INIT == "smol":
    encoder = VisionEncoder.from_siglip("course-vit-smol").resized(72)
else:
    encoder = VisionEncoder(VisionConfig(image_size=72, patch_size=8, hidden_size=192, intermediate_size=768,
                                         num_layers=4, num_heads=3))
cfg = encoder.cfg
transform = ImageTransform(cfg)
t0 = time.perf_counter()
train = dataset(min(STEPS * 128, 40_000), 0, transform)
held = dataset(1000, 1, transform)
print(f"drawn in {time.perf_counter() - t0:.0f} s", flush=True)
width = cfg.hidden_size * R * R
heads = nn.ModuleDict({"colour": nn.Linear(width, 1 + len(synthetic.COLOURS)),
                       "shape": nn.Linear(width, 1 + len(synthetic.SHAPES))})
params = list(encoder.parameters()) + list(heads.parameters())
opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.05, betas=(0.9, 0.98))


def forward(px):
    blocks = pixel_shuffle(encoder(px.float()), R)
    return heads["colour"](blocks), heads["shape"](blocks)


@torch.no_grad()
def check():
    encoder.eval()
    c, s = forward(held[0])
    encoder.train()
    ok = (c.argmax(-1) == held[1]) & (s.argmax(-1) == held[2])
    obj = held[1] > 0
    return (f"colour {float((c.argmax(-1) == held[1]).float().mean()):.3f} shape(objects) "
            f"{float((s.argmax(-1) == held[2])[obj].float().mean()):.3f} block {float(ok.float().mean()):.3f} "
            f"scene {float(ok.all(1).float().mean()):.3f}")


n = len(train[0])
t0 = time.perf_counter()
for step in range(STEPS):
    lr = LR * min(1, (step + 1) / 30) * 0.5 * (1 + np.cos(np.pi * step / STEPS))
    for g in opt.param_groups:
        g["lr"] = lr
    idx = torch.randint(0, n, (128,))
    c, s = forward(train[0][idx])
    loss = F.cross_entropy(c.flatten(0, 1), train[1][idx].flatten()) + F.cross_entropy(s.flatten(0, 1),
                                                                                        train[2][idx].flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if (step + 1) % 100 == 0 or step == 0:
        print(f"step {step + 1} loss {loss.item():.3f} {time.perf_counter() - t0:.0f} s | held-out {check()}",
              flush=True)
torch.save({"encoder": encoder.state_dict()}, f"runs/experiments/vit_blocks_{STEPS}_{INIT}.pt")
