"""Dynamic int8 quantisation of the ONNX graphs, and what it costs in accuracy.

"Dynamic" (onnxruntime.quantization.quantize_dynamic): weights are stored as int8 with one float scale
per output channel, computed once from the weights; activations are quantised on the fly, per call, from
their observed range. No calibration data is needed, and the weight bytes shrink ~4x, which matters twice:
a smaller file, and (decode being memory-bound) fewer bytes read per generated token.

Only MatMul/Gemm are quantised: they hold nearly all the weights; the patch-embedding Conv and the norms
stay float (ConvInteger is poorly supported outside the CPU provider).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def quantize_int8(source, target, per_channel: bool = True) -> Path:
    """Write an int8 copy of an ONNX graph (weights int8 per channel, activations quantised at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, target = Path(source), Path(target)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist: export the fp32 graph first")
    target.parent.mkdir(parents=True, exist_ok=True)
    prepared = target.with_name(f".{target.stem}-prepared.onnx")
    try:
        # onnxruntime's recommended pre-pass (graph clean-up + ONNX shape inference). Its symbolic shape
        # inference cannot follow the decoder's dynamic KV-cache lengths, so that part is skipped.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(prepared, target, weight_type=QuantType.QInt8, per_channel=per_channel,
                         op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        prepared.unlink(missing_ok=True)
    return target


def file_mb(path) -> float:
    return os.path.getsize(path) / 2**20


@dataclass
class Int8Report:
    """fp32 vs int8 on the same held-out questions, run through the bundle's own runner (run.py)."""

    fp32_mb: float  # image encoder + decoder graphs
    int8_mb: float
    num_questions: int
    fp32_score: float  # mean of the subset's metric (vlm_course.evaluation.score_answer)
    int8_score: float
    same_answer: float  # fraction of questions where both give the identical answer text
    same_first_token: float
    rows: list[dict] = field(default_factory=list)

    @property
    def size_ratio(self) -> float:
        return self.int8_mb / self.fp32_mb

    @property
    def score_change(self) -> float:
        return self.int8_score - self.fp32_score

    def summary(self) -> str:
        return (f"int8 vs fp32 on {self.num_questions} held-out questions: size {self.fp32_mb:.1f} -> "
                f"{self.int8_mb:.1f} MB (x{self.size_ratio:.2f}); score {self.fp32_score:.3f} -> "
                f"{self.int8_score:.3f} ({self.score_change:+.3f}); identical answers {self.same_answer:.0%}, "
                f"identical first token {self.same_first_token:.0%}")


def _first_turn(row: dict):
    """(image, question, answers, subset) from a the_cauldron-style row (as load_mini_cauldron returns)."""
    texts, images = row.get("texts"), row.get("images")
    if not texts or not images:
        raise ValueError("compare_int8_accuracy needs rows in the_cauldron schema with 'images' and 'texts'")
    subset = (row.get("source") or texts[0].get("source") or "vqa").removeprefix("synthetic-")
    return images[0], texts[0]["user"], [texts[0]["assistant"]], subset


def compare_int8_accuracy(bundle_dir, rows, max_new_tokens: int = 16, provider: str = "cpu",
                          progress: bool = True) -> Int8Report:
    """Answer the same held-out rows with the fp32 and int8 graphs of a bundle (built with int8=True).

    rows: the_cauldron-style dicts, e.g. `vlm_course.data.cauldron.load_mini_cauldron("test")`. Each answer
    is scored with the metric of its subset (VQA accuracy, ANLS, MMStar letter match, box IoU).
    """
    from tqdm.auto import tqdm

    from ..evaluation import score_answer
    from .bundle import load_runtime

    runtime = load_runtime()
    fp32 = runtime.VLMRunner(bundle_dir, provider=provider)
    if "decoder_int8" not in fp32.config["files"]:
        raise ValueError(f"{bundle_dir} has no int8 graphs: build it with build_bundle(..., int8=True)")
    int8 = runtime.VLMRunner(bundle_dir, provider=provider, int8=True, verify=False)
    files = fp32.config["files"]
    folder = Path(bundle_dir)
    fp32_mb = file_mb(folder / files["image_encoder"]) + file_mb(folder / files["decoder"])
    int8_mb = file_mb(folder / files["image_encoder_int8"]) + file_mb(folder / files["decoder_int8"])

    rows = list(rows)
    if not rows:
        raise ValueError("no rows to compare on")
    records = []
    for row in tqdm(rows, desc="fp32 vs int8", disable=not progress):
        image, question, answers, subset = _first_turn(row)
        ids32 = fp32.generate_ids(image, question, max_new_tokens)
        ids8 = int8.generate_ids(image, question, max_new_tokens)
        text32, text8 = fp32.decode(ids32), int8.decode(ids8)
        records.append({
            "subset": subset, "question": question, "answers": answers, "fp32": text32, "int8": text8,
            "fp32_score": score_answer(subset, text32, answers), "int8_score": score_answer(subset, text8, answers),
            "same_first_token": ids32[0] == ids8[0],
        })
    n = len(records)
    return Int8Report(
        fp32_mb=fp32_mb, int8_mb=int8_mb, num_questions=n,
        fp32_score=sum(r["fp32_score"] for r in records) / n, int8_score=sum(r["int8_score"] for r in records) / n,
        same_answer=sum(r["fp32"] == r["int8"] for r in records) / n,
        same_first_token=sum(r["same_first_token"] for r in records) / n, rows=records,
    )
