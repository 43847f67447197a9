"""int8 quantisation of the ONNX graphs, and what it costs in accuracy.

Two schemes from onnxruntime, neither needs calibration data:

  dynamic    (quantize_dynamic; the default) weights int8 with one scale per output channel; activations
             quantised to uint8 on the fly with ONE scale per tensor per call; the matmul runs in integers
             (MatMulInteger). Weights ~4x smaller.
  blockwise  (MatMulNBits, 8 bits) weights int8 with one scale per block of 32 weights; with
             accuracy_level=4 the CPU kernel also quantises the activations per block of 32 and multiplies
             in int8. Weights ~3.6x smaller (the block scales cost 1 bit per weight).

Why both: transformer activations have a few channels with very large values ("outlier features",
Dettmers et al., LLM.int8()). One scale per activation tensor must cover them, so every other channel
keeps only a few of the 256 levels; with a scale per 32 values an outlier only coarsens its own block.
Measured on SmolLM2-135M (ONNX decoder, a teacher-forced text prompt of 31 tokens; 2 shared CPU cores):

    scheme                          next-token argmax = fp32   max |logit error|   decode step
    fp32                            -                          -                   192 ms
    dynamic                         81%                        22.7 (logits ~38)    65 ms
    blockwise (accuracy_level=4)    94%                         1.4                100 ms
    blockwise, float activations    100%                        0.9               1524 ms  (no fast kernel)

On an x86 CPU without VNNI (AVX2 or AVX512 only), onnxruntime's uint8 x int8 kernel (VPMADDUBSW) adds
pairs of products in int16 and can saturate: there the dynamic scheme quantises weights to 7 bits
(`reduce_range`, as onnxruntime's documentation advises). Measured on the tiny test model on an AVX2-only
EPYC: relative logit error 0.29 with 8-bit weights, 0.07 with 7-bit ones.

Decode is memory-bound, so both int8 schemes read ~4x fewer bytes per token than fp32.
Only MatMul/Gemm are quantised: they hold nearly all the weights; the patch-embedding Conv and the norms
stay float (ConvInteger is poorly supported outside the CPU provider).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

SCHEMES = ("dynamic", "blockwise")


def cpu_has_vnni() -> bool:
    """True where x86 int8 dot products accumulate in int32 (AVX512-VNNI), or off x86 (ARM's kernels, e.g. on
    a Jetson, don't saturate either). Asked of torch, as `training.autocast_dtype` asks about bf16; if torch
    cannot tell, 7-bit weights are the safe answer."""
    import platform

    import torch

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    return getattr(torch.cpu, "_is_vnni_supported", lambda: False)()


def quantize_int8(
    source, target, scheme: str = "dynamic", per_channel: bool = True, block_size: int = 32,
    reduce_range: bool | None = None,
) -> Path:
    """Write an int8 copy of an ONNX graph with the given scheme (see the module docstring).

    reduce_range (dynamic only): 7-bit weights; None = only on an x86 CPU without VNNI (`cpu_has_vnni`)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if scheme not in SCHEMES:
        raise ValueError(f"int8 scheme must be one of {SCHEMES}, got {scheme!r}")
    source, target = Path(source), Path(target)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist: export the fp32 graph first")
    target.parent.mkdir(parents=True, exist_ok=True)
    prepared = target.with_name(f".{target.stem}-prepared.onnx")
    try:
        # onnxruntime's recommended pre-pass (graph clean-up + ONNX shape inference). Its symbolic shape
        # inference cannot follow the decoder's dynamic KV-cache lengths, so that part is skipped.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        if scheme == "dynamic":
            quantize_dynamic(
                prepared,
                target,
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                reduce_range=(not cpu_has_vnni()) if reduce_range is None else reduce_range,
                op_types_to_quantize=["MatMul", "Gemm"],
            )
        else:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            # accuracy_level=4: int8 compute with activations quantised per block (the fast CPU kernel)
            quantizer = MatMulNBitsQuantizer(
                onnx.load(str(prepared)), bits=8, block_size=block_size, is_symmetric=True, accuracy_level=4
            )
            quantizer.process()
            quantizer.model.save_model_to_file(str(target), False)
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
        return (
            f"int8 vs fp32 on {self.num_questions} held-out questions: size {self.fp32_mb:.1f} -> "
            f"{self.int8_mb:.1f} MB (x{self.size_ratio:.2f}); score {self.fp32_score:.3f} -> "
            f"{self.int8_score:.3f} ({self.score_change:+.3f}); identical answers {self.same_answer:.0%}, "
            f"identical first token {self.same_first_token:.0%}"
        )


def _first_turn(row: dict):
    """(image, question, answers, subset) from a the_cauldron-style row (as load_mini_cauldron returns)."""
    texts, images = row.get("texts"), row.get("images")
    if not texts or not images:
        raise ValueError("compare_int8_accuracy needs rows in the_cauldron schema with 'images' and 'texts'")
    subset = (row.get("source") or texts[0].get("source") or "vqa").removeprefix("synthetic-")
    return images[0], texts[0]["user"], [texts[0]["assistant"]], subset


def compare_int8_accuracy(
    bundle_dir, rows, max_new_tokens: int = 16, provider: str = "cpu", progress: bool = True
) -> Int8Report:
    """Answer the same held-out rows with the fp32 and int8 graphs of a bundle (built with int8=True).

    rows: the_cauldron-style dicts, e.g. `vlm_course.data.cauldron.load_mini_cauldron("test")`. Each answer
    is scored with the metric of its subset (VQA accuracy, ANLS, MMStar letter match, box IoU).
    """
    from tqdm.auto import tqdm

    from ..evaluation import score_answer
    from .runtime import load_runtime

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
        records.append(
            {
                "subset": subset,
                "question": question,
                "answers": answers,
                "fp32": text32,
                "int8": text8,
                "fp32_score": score_answer(subset, text32, answers),
                "int8_score": score_answer(subset, text8, answers),
                "same_first_token": ids32[0] == ids8[0],
            }
        )
    n = len(records)
    return Int8Report(
        fp32_mb=fp32_mb,
        int8_mb=int8_mb,
        num_questions=n,
        fp32_score=sum(r["fp32_score"] for r in records) / n,
        int8_score=sum(r["int8_score"] for r in records) / n,
        same_answer=sum(r["fp32"] == r["int8"] for r in records) / n,
        same_first_token=sum(r["same_first_token"] for r in records) / n,
        rows=records,
    )
