"""Training throughput of one VLM step, as a fraction of this machine's matmul peak, measured in the same run.

    python benchmarks/bench_train_throughput.py [--batch 8 --text 112 --steps 3 --recipes full,qlora]

Model: the `smol` shapes (4-layer 192-wide ViT on 64 px images, pixel shuffle r=2 -> 16 image tokens,
SmolLM2-135M-sized decoder), randomly initialised: throughput does not depend on the weights' values.
Batch: `batch` samples of 16 image tokens + `text` text tokens; the answer (trained) is the last 16 tokens.

What is counted (multiply-add = 2 FLOPs), per training step:
  forward = 2 x (matmul weights of the decoder blocks) x tokens            [the "2N" of 6N per token]
          + 2 x (lm_head 576 x 49152) x answer positions                    [our loss runs the head there only]
          + causal attention: 2 x T^2 x width per layer and sample           [QK^T and AV, half the square]
          + 2 x (ViT matmul weights + patch conv) x patches + ViT attention 4 x P^2 x width per layer
          + 2 x (projector weights) x image tokens
  full recipe (everything trains): FLOPs = 3 x forward (backward = grads of inputs + of weights = 2 x forward),
    i.e. the usual 6 x params x tokens plus attention and the head;
  LoRA/QLoRA recipes: frozen weights need only input gradients: FLOPs = 2 x forward (the tiny adapters ignored;
    the NF4 dequantisation is not counted as FLOPs).
Embedding look-ups, norms, activations, softmax and the optimiser are not counted (their time is).
Peak: the best of several large square matmuls (fp32 and bf16) timed in this same process, interleaved with
the training steps so both see the same machine load. Utilisation = achieved FLOP/s / peak of the same dtype.
With --threads 1 both are timed in CPU seconds of this process (robust to other jobs on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLM_COURSE_OFFLINE", "1")

import torch  # noqa: E402

from vlm_course.config import get_profile  # noqa: E402
from vlm_course.processing import IGNORE_INDEX, load_tokenizer  # noqa: E402
from vlm_course.training import TrainConfig, Trainer  # noqa: E402
from vlm_course.vlm import VisionLanguageModel  # noqa: E402

ANSWER_TOKENS = 16


# Wall-clock by default. With --threads 1 the benchmark times CPU seconds of this process instead: on a shared
# machine that is the time the work really spent on a core, so other people's jobs do not enter the ratio.
clock = time.perf_counter


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of the fastest of `repeats` n x n @ n x n products (2 n^3 FLOPs each)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        a @ b
        best = min(best, clock() - start)
    return 2 * n**3 / best


def linear_params(module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))


def forward_flops(model, batch: int, text: int) -> dict[str, float]:
    cfg = model.config
    image_tokens = cfg.image_tokens_per_image
    seq = image_tokens + text
    dec, vis = cfg.decoder, cfg.vision
    blocks = linear_params(model.decoder.layers)
    return {
        "decoder blocks": 2 * blocks * batch * seq,
        "decoder attention": 2 * seq**2 * dec.num_heads * dec.head_dim * dec.num_layers * batch,
        "lm_head (answer positions)": 2 * dec.hidden_size * dec.vocab_size * ANSWER_TOKENS * batch,
        "vision": 2 * linear_params(model.vision) * vis.num_patches * batch
        + 4 * vis.num_patches**2 * vis.hidden_size * vis.num_layers * batch,
        "projector": 2 * linear_params(model.projector) * image_tokens * batch,
    }


def make_batch(model, image_token_id: int, batch: int, text: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    image_tokens = model.config.image_tokens_per_image
    ids = torch.randint(100, 40000, (batch, image_tokens + text), generator=generator)
    ids[:, :image_tokens] = image_token_id
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -ANSWER_TOKENS:] = ids[:, -ANSWER_TOKENS:]
    size = model.config.vision.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.randn(batch, 3, size, size, generator=generator)}


class FixedBatches:
    """Stands in for the collator: the trainer then times exactly the model step."""

    def __init__(self, batch):
        self.batch = batch

    def __call__(self, rows):
        return self.batch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text", type=int, default=112, help="text tokens per sample (after 16 image tokens)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--recipes", default="full,qlora", help="comma-separated: full, lora, qlora")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    global clock
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.threads == 1:
        clock = time.process_time

    tokenizer = load_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    peaks = {"fp32": [], "bf16": []}
    print(f"smol-sized VLM step: batch {args.batch} x ({16} image + {args.text} text tokens), {ANSWER_TOKENS} "
          f"answer tokens each; {torch.get_num_threads()} threads; median of {args.steps} steps after a warm-up; "
          f"{'CPU' if clock is time.process_time else 'wall-clock'} seconds")
    rows = []
    for recipe in args.recipes.split(","):
        for precision in args.precisions.split(","):
            torch.manual_seed(0)
            config = get_profile("smol").config
            config.image_token_id = image_token_id
            model = VisionLanguageModel(config)
            flops = forward_flops(model, args.batch, args.text)
            multiplier = 3 if recipe == "full" else 2
            train_cfg = TrainConfig(vision="full" if recipe == "full" else "frozen", projector="full",
                                    decoder=recipe, precision=precision, progress=False, max_steps=args.steps + 1,
                                    warmup_fraction=0.0, output_dir="/tmp/bench_train_throughput")
            trainer = Trainer(model, None, [None], train_cfg, collator=FixedBatches(make_batch(
                model, image_token_id, args.batch, args.text)))
            trainer.train_step()  # warm-up
            times = []
            for _ in range(args.steps):
                peaks[precision].append(matmul_peak(torch.float32 if precision == "fp32" else torch.bfloat16))
                start = clock()
                trainer.train_step()
                times.append(clock() - start)
            step = statistics.median(times)
            achieved = multiplier * sum(flops.values()) / step
            peak = max(peaks[precision])
            rows.append((recipe, precision, step, achieved, peak))
            print(f"{recipe:>5} {precision}: step {step:6.2f} s  {achieved / 1e9:6.1f} GFLOP/s  peak matmul "
                  f"{peak / 1e9:6.1f} GFLOP/s  -> utilisation {achieved / peak:.2f}", flush=True)
            del trainer, model
    print("forward GFLOPs per step: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in flops.items()))
    best = max(rows, key=lambda r: r[3] / r[4])
    print(f"best utilisation {best[3] / best[4]:.2f} ({best[0]}, {best[1]}); goal >= 0.5")
    return 0


if __name__ == "__main__":
    sys.exit(main())
