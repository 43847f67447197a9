"""Deployment: from a trained VLM to a folder that runs on a Jetson Orin Nano without PyTorch.

    merge.py        fold LoRA adapters into the base weights
    onnx_export.py  vision+projector graph, decoder with KV-cache inputs/outputs, embeddings; parity check
    quantize.py     dynamic int8 quantisation (onnxruntime) and its accuracy change on held-out questions
    gguf_export.py  the decoder as a llama.cpp GGUF file; round trip through transformers' GGUF reader
    budget.py       memory budget and decode roofline for a device (Orin Nano presets)
    bundle.py       the bundle folder: model files, tokenizer, run.py, benchmark.py, README, manifest
    runtime.py      templates/run.py (the bundle's runtime, no torch) loaded as a module, for tests and reports
    report.py       `python -m vlm_course.deploy.report`: build a bundle and print every round-trip figure
    llama_cpp.py    an Idefics3 save as llama.cpp's text + mmproj GGUF pair, run by llama-mtmd-cli, vs PyTorch
    llama_cpp_build.py  builds llama-mtmd-cli once per machine from llama-cpp-python's sdist (make setup)

Command line: `python -m vlm_course export --model DIR --out BUNDLE [--int8] [--gguf | --no-gguf]`;
`--format llama.cpp` writes llama.cpp's text + mmproj GGUF pair instead (llama_cpp.py).
"""

from __future__ import annotations

import argparse
import sys

from .budget import (
    ORIN_NANO_8GB,
    ORIN_NANO_SUPER,
    PRESETS,
    DevicePreset,
    MemoryBudget,
    decode_roofline,
    estimate_memory,
    measure_memory_bandwidth,
    this_machine,
)
from .bundle import build_bundle, load_model_for_export, verify_bundle
from .gguf_export import check_gguf_roundtrip, export_gguf
from .merge import merge_lora_adapters
from .onnx_export import check_onnx_parity, export_onnx, make_session
from .quantize import compare_int8_accuracy, quantize_int8
from .runtime import load_runtime

__all__ = [
    "ORIN_NANO_8GB",
    "ORIN_NANO_SUPER",
    "PRESETS",
    "DevicePreset",
    "MemoryBudget",
    "build_bundle",
    "check_gguf_roundtrip",
    "check_onnx_parity",
    "compare_int8_accuracy",
    "decode_roofline",
    "estimate_memory",
    "export_gguf",
    "export_main",
    "export_onnx",
    "load_model_for_export",
    "load_runtime",
    "make_session",
    "measure_memory_bandwidth",
    "merge_lora_adapters",
    "quantize_int8",
    "this_machine",
    "verify_bundle",
]


def build_export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vlm_course export",
        description="Export a saved VLM into a deployment bundle: ONNX graphs, GGUF decoder, tokenizer, "
        "a standalone run.py and benchmark.py, and a README for the Jetson Orin Nano.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="folder written by model.save_pretrained (config.json + "
        "model.safetensors), e.g. <train output>/model",
    )
    parser.add_argument("--out", required=True, help="bundle folder to create")
    parser.add_argument(
        "--format",
        choices=["bundle", "llama.cpp"],
        default="bundle",
        help="bundle: ONNX + run.py (the options below); llama.cpp: text + mmproj GGUF (f16, q8_0) made by "
        "llama.cpp's converter, for llama-mtmd-cli, with a Jetson README (--model may be an Idefics3 save)",
    )
    parser.add_argument("--int8", action="store_true", help="also write int8 graphs")
    parser.add_argument(
        "--int8-scheme",
        choices=["dynamic", "blockwise"],
        default="dynamic",
        help="dynamic: one scale per activation tensor (quantize_dynamic); blockwise: one scale per 32 "
        "weights and per 32 activations (MatMulNBits), more accurate on SmolLM2 (see quantize.py)",
    )
    parser.add_argument(
        "--gguf",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write the decoder as GGUF for llama.cpp (default: yes)",
    )
    parser.add_argument("--gguf-dtype", choices=["f16", "f32"], default="f16")
    parser.add_argument(
        "--exporter",
        choices=["torchscript", "dynamo"],
        default="torchscript",
        help="torch.onnx exporter (see vlm_course/deploy/onnx_export.py for why torchscript)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    return parser


def export_main(argv=None) -> int:
    args = build_export_parser().parse_args(argv)
    if args.format == "llama.cpp":
        from .llama_cpp import export_llama_cpp

        try:
            out = export_llama_cpp(args.model, args.out, overwrite=args.overwrite)
        except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {out}; see {out}/README.md for llama-mtmd-cli on a Jetson Orin Nano")
        return 0
    try:
        out = build_bundle(
            args.model,
            args.out,
            int8=args.int8,
            gguf=args.gguf,
            gguf_dtype=args.gguf_dtype,
            exporter=args.exporter,
            overwrite=args.overwrite,
            int8_scheme=args.int8_scheme,
        )
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}. Try: python {out}/run.py --image IMAGE --question 'What is in the image?'")
    return 0
