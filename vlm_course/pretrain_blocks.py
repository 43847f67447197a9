"""Pretrain the demo's ViT so that every block of its output knows what sits in that part of the picture.

    python -m vlm_course.pretrain_blocks                  # writes assets/vit_demo (~18 min on 2 CPU cores)
    python -m vlm_course.pretrain_blocks --steps 20 --out /tmp/vit   # a quick try

Why a second pretraining? The demo's decoder answers "where is the red circle?" or "how many squares?" by
reading the image tokens. It learns that in few steps only if each token already says, plainly, what is in
its part of the picture (docs/demo_findings.md measured the alternative: a ViT whose patches know colour and
shape, read through a projector trained by the decoder's loss, left counting and position at chance). So:

  the image       64 px scenes resized to 72 px, 8 px patches: a 9 x 9 grid
  the blocks      pixel shuffle by 3 (exactly what the projector does): 3 x 3 blocks, one per part of the
                  picture a person names (top left ... bottom right)
  the heads       per block, from the shuffled block vector: the colour and the shape of the object whose
                  centre lies in that block, or "none" (the larger object where two centres share a block)

The encoder starts from the `smol` ViT (assets/vit_smol, 64 px), its position embeddings resampled to the 9 x 9
grid (`VisionEncoder.resized`). The heads are thrown away; the encoder is saved in SigLIP naming, like
assets/vit_smol. The scenes are fresh draws from the mini-cauldron's drawing code, never its test seeds.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import synthetic
from .pretrain_vit import random_specs, save_siglip
from .processing import ImageTransform
from .projector import pixel_shuffle
from .vision import VisionEncoder

SCENE_SIZE = 64  # the mini-cauldron's image size


@dataclass
class BlockPretrainConfig:
    steps: int = 800  # held-out block accuracy 0.98 at 800 (0.92 at 100); ~18 min on 2 cores
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    num_images: int = 40_000  # drawn once (~70 s), then sampled with replacement
    image_size: int = 72
    shuffle_factor: int = 3
    init: str = "course-vit-smol"  # the encoder to start from (resized to image_size)
    seed: int = 0


def block_of(shape: synthetic.Shape, side: int, image_size: int = SCENE_SIZE) -> int:
    """Row-major index of the block (of a side x side grid) that holds the shape's centre."""
    row = min(side - 1, int(shape.cy * side / image_size))
    col = min(side - 1, int(shape.cx * side / image_size))
    return row * side + col


def block_objects(shapes, side: int, image_size: int = SCENE_SIZE) -> list:
    """Per block, row by row: the object whose centre lies in it, or None. Where two centres share a block
    (rare: small crowded scenes), the larger object is the block's."""
    named: list = [None] * (side * side)
    for s in sorted(shapes, key=lambda s: -s.size):
        k = block_of(s, side, image_size)
        if named[k] is None:
            named[k] = s
    return named


def block_labels(shapes, side: int, image_size: int = SCENE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Colour and shape class per block: 0 = no object, else 1 + index in synthetic.COLOURS / SHAPES."""
    objects = block_objects(shapes, side, image_size)
    colour = np.array([0 if s is None else 1 + synthetic.COLOURS.index(s.colour) for s in objects])
    shape = np.array([0 if s is None else 1 + synthetic.SHAPES.index(s.shape) for s in objects])
    return colour, shape


def random_scene(rng: np.random.Generator) -> list[synthetic.Shape]:
    """1-5 objects at the sizes the mini-cauldron uses (0.17-0.25 of the side for count, to 0.22-0.36 for shapes)."""
    lo = rng.uniform(0.14, 0.24)
    return synthetic.place(rng, random_specs(rng), SCENE_SIZE, (lo, lo + 0.12), gap=2.0)


def make_dataset(n: int, seed: int, transform: ImageTransform, side: int, progress: bool = True) -> dict:
    """n fresh scenes: pixel values (float16, as the processor makes them) and per-block labels."""
    rng = np.random.default_rng([seed, 5])
    pixels, colours, shapes_ = [], [], []
    for _ in tqdm(range(n), desc="drawing scenes", disable=not progress):
        shapes = random_scene(rng)
        pixels.append(transform(synthetic.render(rng, SCENE_SIZE, shapes)).half())
        colour, shape = block_labels(shapes, side)
        colours.append(colour)
        shapes_.append(shape)
    return {"pixels": torch.stack(pixels), "colour": torch.from_numpy(np.stack(colours)),
            "shape": torch.from_numpy(np.stack(shapes_))}


class BlockHeads(nn.Module):
    """Linear heads on the pixel-shuffled block vectors: a linear read-out is what the projector will do."""

    def __init__(self, width: int, r: int):
        super().__init__()
        self.r = r
        self.colour = nn.Linear(width * r * r, 1 + len(synthetic.COLOURS))
        self.shape = nn.Linear(width * r * r, 1 + len(synthetic.SHAPES))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = pixel_shuffle(features, self.r)
        return self.colour(blocks), self.shape(blocks)


@torch.no_grad()
def block_accuracy(encoder: VisionEncoder, heads: BlockHeads, data: dict) -> dict[str, float]:
    """Held-out accuracy: colour per block, shape per object block, both per block, and whole scenes right."""
    was_training = encoder.training
    encoder.eval()
    colour, shape = heads(encoder(data["pixels"].float()))
    encoder.train(was_training)
    colour_ok, shape_ok = colour.argmax(-1) == data["colour"], shape.argmax(-1) == data["shape"]
    both = colour_ok & shape_ok
    return {"colour": float(colour_ok.float().mean()), "shape_of_objects": float(shape_ok[data["colour"] > 0].float().mean()),
            "block": float(both.float().mean()), "scene": float(both.all(1).float().mean())}


def lr_at(step: int, cfg: BlockPretrainConfig) -> float:
    warmup = min(1.0, (step + 1) / cfg.warmup_steps)
    return cfg.lr * warmup * 0.5 * (1 + np.cos(np.pi * step / cfg.steps))


def pretrain_blocks(cfg: BlockPretrainConfig, progress: bool = True) -> tuple[VisionEncoder, dict]:
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    encoder = VisionEncoder.from_siglip(cfg.init).resized(cfg.image_size)
    side = encoder.cfg.grid_size // cfg.shuffle_factor
    transform = ImageTransform(encoder.cfg)
    train = make_dataset(cfg.num_images, cfg.seed, transform, side, progress)
    held_out = make_dataset(1000, cfg.seed + 1, transform, side, progress)
    heads = BlockHeads(encoder.cfg.hidden_size, cfg.shuffle_factor)
    params = list(encoder.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    history = []
    bar = tqdm(range(cfg.steps), desc="pretraining ViT blocks", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        idx = torch.randint(0, cfg.num_images, (cfg.batch_size,))  # the global generator, seeded above
        colour, shape = heads(encoder(train["pixels"][idx].float()))
        loss = (F.cross_entropy(colour.flatten(0, 1), train["colour"][idx].flatten())
                + F.cross_entropy(shape.flatten(0, 1), train["shape"][idx].flatten()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        history.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    metrics = block_accuracy(encoder, heads, held_out)
    metrics.update(final_loss=float(np.mean(history[-20:])), minutes=(time.perf_counter() - start) / 60)
    return encoder.eval(), {"metrics": metrics, "loss_history": history}


def default_out():
    from .weights import assets_dir

    return assets_dir() / "vit_demo"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Pretrain the demo's ViT with per-block heads (CPU, ~18 min).")
    parser.add_argument("--out", default=None, help="output folder (default: assets/vit_demo)")
    parser.add_argument("--steps", type=int, default=BlockPretrainConfig.steps)
    parser.add_argument("--num-images", type=int, default=BlockPretrainConfig.num_images)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cfg = BlockPretrainConfig(steps=args.steps, num_images=args.num_images, seed=args.seed,
                              warmup_steps=min(BlockPretrainConfig.warmup_steps, max(1, args.steps // 10)))
    encoder, result = pretrain_blocks(cfg, progress=not args.no_progress)
    m = result["metrics"]
    out = save_siglip(encoder, args.out or default_out(), extra={"recipe": asdict(cfg), "held_out": m})
    print(f"held-out: block colour {m['colour']:.3f}, shape of objects {m['shape_of_objects']:.3f}, block "
          f"{m['block']:.3f}, whole scene {m['scene']:.3f} | {m['minutes']:.1f} min | saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
