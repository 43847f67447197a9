"""Can the second vision branch learn to *name* a word at all, in minutes? (docs/reading_and_pointing.md)

    python docs/demo_experiments/word_head.py --minutes 8 --train 6000 --test 300

The reading experiment's vision stage asked every one of the 128 px branch's 16 tokens to be a word's embedding, and
named no held-out word. This asks the easiest form of the question: the same branch (the course ViT resized to
128 px, `VisionEncoder.resized`) with a small head on its 16 pixel-shuffled tokens (`WordHead`), trained end to end as a
classifier over the mini-cauldron's closed list of words (`synthetic.WORDS`), on small-print pictures
(`reading.small_print`, train seed 0) and tested on held-out pictures (seed 1: the same words, other fonts,
sizes, places and colours). If the branch names held-out words well here, an image side that writes the word's
own token embeddings (as the demo's count tokens write digits) would give the decoder something to copy; if it
does not, no QLoRA budget can. Prints accuracy on the held-out pictures as training goes, and JSON at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLM_COURSE_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vlm_course.data import synthetic  # noqa: E402
from vlm_course.data.reading import small_print  # noqa: E402
from vlm_course.processing import ImageTransform  # noqa: E402
from vlm_course.projector import pixel_shuffle  # noqa: E402
from vlm_course.vision import VisionEncoder  # noqa: E402
from vlm_course.weights import assets_dir  # noqa: E402


class WordHead(nn.Module):
    """The branch's 16 tokens (pixel shuffle 4 of a 16 x 16 patch grid), each normalised and cut to 128 numbers, side by
    side (their order is where the letters are) -> one score per word. A single linear layer on all 49,152 numbers
    diverged at lr 1e-3 (the loss rose from 4.8 to 117 in 50 steps): Adam moves every weight by ~lr per step, so a
    logit then moves by ~lr x 49,152 x the features' size."""

    def __init__(self, vision: VisionEncoder, r: int, num_words: int, width: int = 128):
        super().__init__()
        self.vision, self.r = vision, r
        blocks = (vision.cfg.image_size // vision.cfg.patch_size // r) ** 2
        features = vision.cfg.hidden_size * r * r
        self.norm = nn.LayerNorm(features)
        self.cut = nn.Linear(features, width)
        self.head = nn.Linear(blocks * width, num_words)
        nn.init.zeros_(self.head.weight)  # every word equally likely at the start: the loss starts at log(119)
        nn.init.zeros_(self.head.bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.cut(self.norm(pixel_shuffle(self.vision(pixels), self.r)))
        return self.head(F.gelu(tokens).flatten(1))


def pictures(n: int, seed: int, size: int, transform) -> tuple[torch.Tensor, torch.Tensor]:
    rows = small_print(n, seed=seed, image_size=size)
    index = {w: i for i, w in enumerate(synthetic.WORDS)}
    pixels = torch.stack([transform(r["images"][0]) for r in rows])
    return pixels, torch.tensor([index[r["texts"][0]["assistant"]] for r in rows])


@torch.no_grad()
def accuracy(model: WordHead, pixels, labels, batch: int = 100) -> float:
    model.eval()
    right = sum(int((model(pixels[i:i + batch]).argmax(-1) == labels[i:i + batch]).sum())
                for i in range(0, len(labels), batch))
    model.train()
    return right / len(labels)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=8.0, help="training time (wall clock)")
    p.add_argument("--train", type=int, default=6000, help="training pictures (drawn once)")
    p.add_argument("--test", type=int, default=300, help="held-out pictures")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr-vision", type=float, default=3e-4)
    p.add_argument("--lr-head", type=float, default=3e-4)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    vision = VisionEncoder.from_siglip(assets_dir() / "vit_smol").resized(args.image_size)
    transform = ImageTransform(vision.cfg)
    start = time.perf_counter()
    train_x, train_y = pictures(args.train, 0, args.image_size, transform)
    test_x, test_y = pictures(args.test, 1, args.image_size, transform)
    drawing = time.perf_counter() - start
    model = WordHead(vision, r=4, num_words=len(synthetic.WORDS))
    head = [p for name, p in model.named_parameters() if not name.startswith("vision.")]
    opt = torch.optim.AdamW([{"params": model.vision.parameters(), "lr": args.lr_vision},
                             {"params": head, "lr": args.lr_head}], weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    curve, step, cpu = [], 0, time.process_time()
    start = time.perf_counter()
    print(f"{len(synthetic.WORDS)} words, {args.train} training / {args.test} held-out pictures "
          f"({drawing:.0f} s to draw), {torch.get_num_threads()} thread(s), load {os.getloadavg()[0]:.2f}", flush=True)
    while time.perf_counter() - start < args.minutes * 60:
        pick = torch.randint(len(train_y), (args.batch_size,), generator=generator)
        loss = F.cross_entropy(model(train_x[pick]), train_y[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % args.eval_every == 0:
            acc = accuracy(model, test_x, test_y)
            curve.append({"step": step, "loss": loss.item(), "held_out_accuracy": acc,
                          "minutes": (time.perf_counter() - start) / 60})
            print(f"step {step}: loss {loss.item():.3f}, held-out accuracy {acc:.3f} "
                  f"({curve[-1]['minutes']:.1f} min)", flush=True)
    result = {"args": vars(args), "steps": step, "held_out_accuracy": accuracy(model, test_x, test_y),
              "train_accuracy_sample": accuracy(model, train_x[:args.test], train_y[:args.test]),
              "chance": 1 / len(synthetic.WORDS), "wall_minutes": (time.perf_counter() - start) / 60,
              "cpu_seconds": time.process_time() - cpu, "load_average_end": os.getloadavg()[0], "curve": curve}
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
