"""The LM head on the last positions: a strided slice against a contiguous copy, side by side in one run.

    python benchmarks/bench_lm_head.py [--batch 50] [--repeats 3] [--checkpoint assets/demo_checkpoint]

`Decoder.forward(..., logits_to_keep=n)` runs the head on the last n positions only. `x[:, -1:]` is a strided view
of the (B, T, 576) hidden states; with the demo's set-up (bf16 autocast on a CPU with AVX512-BF16, the tied head
frozen in bf16) PyTorch could not fold that view into one (B, 576) x (576, 49152) product and instead broadcast the
head to every sample, copying B x 576 x 49152 values first. `decoder.last_positions` hands the head a contiguous
copy of the slice (B x 576 values). Three measurements, each with the old slice and the new copy alternately:

1. the head alone on the demo model's hidden states (B = --batch);
2. `vlm.answer` for B held-out position questions, 4 new tokens (the demo's evaluation batch);
3. one QA training step of 16 samples, forward and backward (the demo's training batch; the loss calls the decoder
   with logits_to_keep=1 and runs the head itself at the answer positions).

On a CPU without native bf16 the demo computes in fp32 and the difference may be small: the script prints what it
measures, with the dtype. Use an idle machine; the two contenders alternate so a background load hits both alike.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLM_COURSE_OFFLINE", "1")

import torch  # noqa: E402
from bench_core import alternate  # noqa: E402  (median of each, run alternately after a warm-up)

import vlm_course.decoder as decoder_module  # noqa: E402

CONTIGUOUS = decoder_module.last_positions  # what the decoder does now


def strided_last_positions(x: torch.Tensor, n: int) -> torch.Tensor:
    """What the decoder did before: the view itself."""
    return x[:, -n:] if n else x


def with_last_positions(fn, run):
    """run(), with the decoder's head fed by `fn` for that call only."""
    def go():
        kept = decoder_module.last_positions
        decoder_module.last_positions = fn
        try:
            run()
        finally:
            decoder_module.last_positions = kept
    return go


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", default="assets/demo_checkpoint")
    args = parser.parse_args()

    from vlm_course.data.collate import VLMCollator
    from vlm_course.demo import as_rows, compute_autocast, load_checkpoint, load_samples
    from vlm_course.training.loss import answer_loss_sum
    from vlm_course.vlm import answer

    model, processor = load_checkpoint(args.checkpoint)
    samples = load_samples("test", ("position",), args.batch)[:args.batch]
    images, questions = [[s["image"]] for s in samples], [s["question"] for s in samples]
    head = model.decoder.lm_head
    compute = "bf16 autocast" if head.weight.dtype == torch.bfloat16 else "fp32"
    print(f"{torch.get_num_threads()} threads; the demo model computes in {compute}")

    hidden = torch.randn(args.batch, 80, head.in_features, dtype=head.weight.dtype)

    def head_only():
        with torch.no_grad(), compute_autocast(model):
            head(decoder_module.last_positions(hidden, 1))

    def generate():
        with compute_autocast(model):
            answer(model, processor, images, questions, max_new_tokens=4)

    collator = VLMCollator(processor)
    batch = collator(as_rows(load_samples("train", ("shapes", "count", "position"), 6)[:16]))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)

    def train_step():
        with compute_autocast(model):
            loss, n = answer_loss_sum(model, batch)
        (loss / n).backward()
        model.zero_grad(set_to_none=True)

    rows = [("LM head, last position", head_only), (f"answer(), {args.batch} questions", generate),
            ("QA training step, 16 samples", train_step)]
    print(f"{'':34s} {'strided s':>10s} {'contiguous s':>13s} {'ratio':>7s}")
    for label, run in rows:
        model.train(run is train_step)
        strided, contiguous = alternate(with_last_positions(strided_last_positions, run),
                                        with_last_positions(CONTIGUOUS, run), args.repeats)
        print(f"{label:34s} {strided:10.3f} {contiguous:13.3f} {strided / contiguous:7.1f}x", flush=True)


if __name__ == "__main__":
    main()
