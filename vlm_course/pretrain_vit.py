"""Pretrain the `smol` profile's small ViT on synthetic shape images, on a CPU, in a few minutes.

    python -m vlm_course.pretrain_vit                 # writes assets/vit_smol (config.json + model.safetensors)
    python -m vlm_course.pretrain_vit --steps 20 --out /tmp/vit   # a quick try

Why pretrain at all? A VLM's decoder can only answer "what colour is the square?" if the image tokens it
reads already carry colour, shape and position. SigLIP learns that from 10^9 image-text pairs; the course
has 2 CPU cores and no network, so it teaches a 4-layer, 192-wide ViT (1.8M parameters, 64 px images,
8 px patches) exactly the facts that the mini-cauldron asks about, with supervised heads on top:

  dense heads   for every patch: the colour and the shape of the object covering it (or background)
                -> each patch vector knows what is there, and where (its position in the grid)
  global heads  from the mean patch vector: how many objects of each shape and of each colour, and in all
                -> counting needs to aggregate over the whole image, which attention has to learn

The scenes come from the mini-cauldron's own drawing code (vlm_course.data.synthetic: same palette,
shapes, sizes and backgrounds), with fresh random layouts, so nothing here is the held-out test data.
The heads are thrown away afterwards; the encoder is saved in transformers' SiglipVisionModel naming, so
`VisionEncoder.from_siglip("course-vit-smol")` (and transformers itself) can load it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import VisionConfig, get_profile
from .data import synthetic
from .vision import VisionEncoder, siglip_name_map

MAX_OBJECTS = 5  # count targets are classes 0..MAX_OBJECTS
COLOURS, SHAPES = synthetic.COLOURS, synthetic.SHAPES


@dataclass
class PretrainConfig:
    steps: int = 600  # ~6-8 min on 2 CPU cores; the dense heads are near-perfect long before
    batch_size: int = 128
    lr: float = 1e-3  # a small ViT from scratch tolerates a high AdamW lr with warmup
    weight_decay: float = 0.05
    warmup_steps: int = 40
    num_images: int = 24_000  # drawn once (~15 s), then reused for a few epochs
    seed: int = 0
    min_cover: int = 16  # a patch is labelled with an object that covers >= 16 of its 64 pixels
    bf16: bool = False  # at this size fp32 is as fast as bf16 on a CPU, and simpler


# ----------------------------------------------------------------------------------------------
# Scenes and their labels


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    patch_colour: np.ndarray  # (grid*grid,) 0 = background, 1 + colour index
    patch_shape: np.ndarray  # (grid*grid,) 0 = background, 1 + shape index
    shape_counts: np.ndarray  # (len(SHAPES),)
    colour_counts: np.ndarray  # (len(COLOURS),)


def random_specs(rng: np.random.Generator) -> list[tuple[str, str]]:
    """1-5 objects; half the scenes have all-different shapes and colours (as the shapes/spatial/mc subsets),
    the other half repeat them freely (as the count subset)."""
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    if n <= min(len(SHAPES), len(COLOURS)) and rng.random() < 0.5:
        shapes = rng.choice(SHAPES, size=n, replace=False)
        colours = rng.choice(COLOURS, size=n, replace=False)
    else:
        shapes, colours = rng.choice(SHAPES, size=n), rng.choice(COLOURS, size=n)
    return [(str(s), str(c)) for s, c in zip(shapes, colours)]


def object_mask(shape: synthetic.Shape, image_size: int) -> np.ndarray:
    """Which pixels the object covers (boolean H x W), drawn like synthetic.render draws it (without anti-aliasing)."""
    mask = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(mask)
    x1, y1, x2, y2 = shape.box
    cx, cy = shape.cx, shape.cy
    if shape.shape == "circle":
        draw.ellipse([x1, y1, x2, y2], fill=1)
    elif shape.shape == "square":
        draw.polygon([(x1, y1), (x2, y1), (x2, y2), (x1, y2)], fill=1)
    elif shape.shape == "triangle":
        draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=1)
    else:  # diamond
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=1)
    return np.asarray(mask, dtype=bool)


def patch_labels(shapes, image_size: int, patch: int, min_cover: int) -> tuple[np.ndarray, np.ndarray]:
    """Per patch: the colour and shape class of the object covering most of it (if it covers >= min_cover px)."""
    grid = image_size // patch
    best = np.zeros((grid, grid), dtype=np.int64)  # pixels covered by the best object so far
    colour = np.zeros((grid, grid), dtype=np.int64)
    shape_id = np.zeros((grid, grid), dtype=np.int64)
    for s in shapes:
        cover = object_mask(s, image_size).reshape(grid, patch, grid, patch).sum(axis=(1, 3))
        wins = (cover >= min_cover) & (cover > best)
        best = np.where(wins, cover, best)
        colour[wins] = 1 + COLOURS.index(s.colour)
        shape_id[wins] = 1 + SHAPES.index(s.shape)
    return colour.reshape(-1), shape_id.reshape(-1)


def make_scene(rng: np.random.Generator, image_size: int, patch: int, min_cover: int) -> Scene:
    specs = random_specs(rng)
    # The subsets draw objects 0.16-0.24 (count) to 0.22-0.36 (shapes) of the image wide: cover both.
    lo = rng.uniform(0.14, 0.24)
    shapes = synthetic.place(rng, specs, image_size, (lo, lo + 0.12), gap=2.0)
    image = np.asarray(synthetic.render(rng, image_size, shapes))
    colour, shape_id = patch_labels(shapes, image_size, patch, min_cover)
    shape_counts = np.array([sum(s.shape == k for s in shapes) for k in SHAPES])
    colour_counts = np.array([sum(s.colour == c for s in shapes) for c in COLOURS])
    return Scene(image, colour, shape_id, shape_counts, colour_counts)


def make_dataset(n: int, cfg: VisionConfig, seed: int, min_cover: int) -> dict[str, torch.Tensor]:
    """n scenes as tensors: pixels normalised as the processor does (SigLIP: (x - 0.5) / 0.5)."""
    rng = np.random.default_rng(seed)
    scenes = [make_scene(rng, cfg.image_size, cfg.patch_size, min_cover) for _ in tqdm(range(n), desc="drawing")]
    pixels = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(cfg.image_mean).view(1, 3, 1, 1), torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    return {
        "pixels": (pixels - mean) / std,
        "patch_colour": torch.from_numpy(np.stack([s.patch_colour for s in scenes])),
        "patch_shape": torch.from_numpy(np.stack([s.patch_shape for s in scenes])),
        "shape_counts": torch.from_numpy(np.stack([s.shape_counts for s in scenes])),
        "colour_counts": torch.from_numpy(np.stack([s.colour_counts for s in scenes])),
    }


# ----------------------------------------------------------------------------------------------
# The model: the encoder plus throw-away heads


class PretrainHeads(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        classes = MAX_OBJECTS + 1
        self.patch_colour = nn.Linear(width, 1 + len(COLOURS))
        self.patch_shape = nn.Linear(width, 1 + len(SHAPES))
        # Counting reads a pooled vector; a small MLP lets the encoder keep counts in a non-linear code.
        self.counts = nn.Sequential(nn.Linear(width, width), nn.GELU(),
                                    nn.Linear(width, (len(SHAPES) + len(COLOURS) + 1) * classes))

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        b = features.shape[0]
        counts = self.counts(features.mean(dim=1)).view(b, len(SHAPES) + len(COLOURS) + 1, MAX_OBJECTS + 1)
        return {"patch_colour": self.patch_colour(features), "patch_shape": self.patch_shape(features),
                "counts": counts}


def count_targets(batch: dict) -> torch.Tensor:
    """(B, shapes + colours + 1) count classes: per shape, per colour, and the total."""
    total = batch["shape_counts"].sum(-1, keepdim=True)
    return torch.cat([batch["shape_counts"], batch["colour_counts"], total], dim=-1).clamp(max=MAX_OBJECTS)


def losses_and_accuracy(out: dict, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    targets = {"patch_colour": batch["patch_colour"], "patch_shape": batch["patch_shape"],
               "counts": count_targets(batch)}
    total, acc = 0.0, {}
    for name, logits in out.items():
        logits = logits.float()
        total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[name].reshape(-1))
        acc[name] = (logits.argmax(-1) == targets[name]).float().mean().item()
    return total, acc


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(encoder, heads, data: dict, batch_size: int = 256) -> dict[str, float]:
    encoder.eval()
    sums, n = {}, len(data["pixels"])
    for i in range(0, n, batch_size):
        batch = {k: v[i:i + batch_size] for k, v in data.items()}
        _, acc = losses_and_accuracy(heads(encoder(batch["pixels"])), batch)
        for k, v in acc.items():
            sums[k] = sums.get(k, 0.0) + v * len(batch["pixels"])
    encoder.train()
    return {k: v / n for k, v in sums.items()}


def pretrain(cfg: PretrainConfig, vision_cfg: VisionConfig) -> tuple[VisionEncoder, dict]:
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    train = make_dataset(cfg.num_images, vision_cfg, cfg.seed, cfg.min_cover)
    held_out = make_dataset(1000, vision_cfg, cfg.seed + 1, cfg.min_cover)
    encoder, heads = VisionEncoder(vision_cfg), PretrainHeads(vision_cfg.hidden_size)
    params = list(encoder.parameters()) + list(heads.parameters())
    # No weight decay on norms, biases and position embeddings (the usual ViT recipe).
    decay = [p for p in params if p.dim() >= 2 and p is not encoder.embeddings.position_embedding.weight]
    no_decay = [p for p in params if all(p is not q for q in decay)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    generator = torch.Generator().manual_seed(cfg.seed)
    order, cursor = torch.randperm(cfg.num_images, generator=generator), 0
    history = []
    bar = tqdm(range(cfg.steps), desc="pretraining ViT")
    for step in bar:
        if cursor + cfg.batch_size > cfg.num_images:  # next epoch
            order, cursor = torch.randperm(cfg.num_images, generator=generator), 0
        idx = order[cursor:cursor + cfg.batch_size]
        cursor += cfg.batch_size
        batch = {k: v[idx] for k, v in train.items()}
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            out = heads(encoder(batch["pixels"]))
        loss, acc = losses_and_accuracy(out, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        history.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", counts=f"{acc['counts']:.2f}", colour=f"{acc['patch_colour']:.2f}")
    metrics = evaluate(encoder, heads, held_out)
    metrics.update(final_loss=float(np.mean(history[-20:])), minutes=(time.perf_counter() - start) / 60)
    return encoder.eval(), {"metrics": metrics, "loss_history": history}


# ----------------------------------------------------------------------------------------------
# Saving in transformers' SigLIP naming


def siglip_config(cfg: VisionConfig) -> dict:
    """config.json of a transformers SiglipVisionModel with this encoder's shape."""
    return {
        "architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_channels": cfg.num_channels, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
        "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": cfg.layer_norm_eps, "attention_dropout": 0.0,
        "vision_use_head": False,  # the course ViT has no attention-pool head (a VLM reads every patch)
    }


def save_siglip(encoder: VisionEncoder, folder, extra: dict | None = None) -> Path:
    """Write config.json + model.safetensors (SiglipVisionModel names, `vision_model.` prefix) atomically."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    names = siglip_name_map(encoder.cfg.num_layers)  # ours -> transformers
    state = encoder.state_dict()
    tensors = {"vision_model." + names[k]: v.detach().float().contiguous() for k, v in state.items()}
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        with open(tmp / "config.json", "w") as f:
            json.dump(siglip_config(encoder.cfg), f, indent=2)
        if extra:
            with open(tmp / "pretraining.json", "w") as f:
                json.dump(extra, f, indent=2)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt", "library": "vlm_course"})
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def default_out() -> Path:
    from .weights import assets_dir

    return assets_dir() / "vit_smol"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Pretrain the smol profile's ViT on synthetic shapes (CPU, minutes).")
    parser.add_argument("--out", default=None, help="output folder (default: assets/vit_smol)")
    parser.add_argument("--steps", type=int, default=PretrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    parser.add_argument("--num-images", type=int, default=PretrainConfig.num_images)
    parser.add_argument("--profile", default="smol", help="profile whose vision config to pretrain (smol)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = PretrainConfig(steps=args.steps, batch_size=args.batch_size, num_images=args.num_images, seed=args.seed,
                         warmup_steps=min(PretrainConfig.warmup_steps, max(1, args.steps // 10)))
    vision_cfg = get_profile(args.profile).config.vision
    encoder, result = pretrain(cfg, vision_cfg)
    m = result["metrics"]
    out = save_siglip(encoder, args.out or default_out(), extra={"recipe": asdict(cfg), "held_out": m})
    print(f"held-out accuracy: patch colour {m['patch_colour']:.3f}, patch shape {m['patch_shape']:.3f}, "
          f"counts {m['counts']:.3f} | {m['minutes']:.1f} min | saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
