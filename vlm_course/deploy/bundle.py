"""A deployment bundle: one folder with everything needed to run the VLM without PyTorch.

    bundle/
      image_encoder.onnx  decoder.onnx  embed_tokens.npy     fp32 ONNX graphs + token embeddings
      image_encoder_int8.onnx  decoder_int8.onnx             with int8=True
      decoder-f16.gguf                                       with gguf=True: the decoder for llama.cpp
      tokenizer/                                             tokenizer.json (+ '<image>'), chat template
      config.json                                            the VLMConfig it was built from
      bundle.json                                            what run.py needs: sizes, token ids, file names
      run.py  benchmark.py  README.md                        standalone runner, benchmark, Jetson notes
      manifest.json                                          size and sha256 of every file above

The folder is built in a temporary directory and renamed into place at the end, so an interrupted build
leaves no half-written bundle behind.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from ..config import VLMConfig
from ..files import file_sha256
from .budget import decode_roofline, deployment_table, kv_bytes_per_token
from .gguf_export import export_gguf
from .merge import merge_lora_adapters
from .onnx_export import DECODER_FILE, EMBEDDINGS_FILE, IMAGE_ENCODER_FILE, check_onnx_parity, export_onnx
from .quantize import quantize_int8
from .runtime import TEMPLATES, load_runtime

BUNDLE_FORMAT = 1
PARITY_TOLERANCE = 1e-3  # refuse to ship graphs whose fp32 logits differ more than this from PyTorch


# ----------------------------------------------------------------------------------------------
# Loading what to export, with errors that say what is wrong


def load_model_for_export(model_or_dir):
    """A VisionLanguageModel (LoRA merged, float32, eval) from a model or a saved folder, checked for export.

    A model passed in is changed in place (adapters merged, cast to float32).
    """
    from ..vlm import CONFIG_NAME, WEIGHTS_NAME, VisionLanguageModel, read_config_file

    if isinstance(model_or_dir, nn.Module):
        model = model_or_dir
    else:
        folder = Path(model_or_dir)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} is not a folder: pass the folder a model was saved to with "
                "model.save_pretrained(folder) (e.g. <train output>/model)"
            )
        if (folder / "adapter_config.json").exists() or (folder / "trainable.safetensors").exists():
            raise ValueError(
                f"{folder} holds a training checkpoint or LoRA adapter, not a full model: load it into "
                "the model, merge (vlm_course.training.merge_lora) and save_pretrained the result, or "
                "export <train output>/model, which `python -m vlm_course train` writes"
            )
        missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).exists()]
        if missing:
            hint = (
                f"did you mean {folder / 'model'}? "
                "(`python -m vlm_course train` writes the merged model there)"
                if (folder / "model" / CONFIG_NAME).exists()
                else "save one with model.save_pretrained(folder)"
            )
            raise FileNotFoundError(
                f"{folder} is not a saved VisionLanguageModel: it lacks {', '.join(missing)}; {hint}"
            )
        config = read_config_file(folder / CONFIG_NAME)  # names the file and every bad key
        check_weight_shapes(config, folder / WEIGHTS_NAME)
        model = VisionLanguageModel.from_pretrained(folder)
    model = merge_lora_adapters(model).float().eval()
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ValueError(
            f"the model has NaN/inf weights in {bad[:3]} (training diverged?): export an earlier "
            "checkpoint or retrain with a lower learning rate"
        )
    return model


def check_weight_shapes(config: VLMConfig, weights_file: Path) -> None:
    """Compare the safetensors header with the shapes the config implies, before loading anything."""
    from safetensors import safe_open

    from ..vlm import VisionLanguageModel

    with torch.device("meta"):  # shapes only: no memory, no random init
        expected = {k: tuple(v.shape) for k, v in VisionLanguageModel(config).state_dict().items()}
    try:
        with safe_open(weights_file, framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a truncated or foreign file
        raise ValueError(
            f"{weights_file} is not a readable safetensors file ({err}): re-save the model"
        ) from err
    mismatched = [
        f"{k}: config {expected[k]} vs weights {found[k]}"
        for k in found
        if k in expected and expected[k] != found[k]
    ]
    missing = sorted(set(expected) - set(found) - {"decoder.lm_head.weight"})
    if mismatched:
        raise ValueError(
            f"config.json does not belong to these weights ({len(mismatched)} shape mismatches, e.g. "
            f"{mismatched[0]}): keep the config.json that was saved with model.safetensors"
        )
    if missing:
        raise ValueError(
            f"{weights_file} lacks {len(missing)} of {len(expected)} tensors (e.g. {missing[:3]}): a "
            "trainable-only or partial save? Export needs the full model (save_pretrained without "
            "trainable_only)"
        )


# ----------------------------------------------------------------------------------------------
# The manifest: every file's size and sha256, checked by run.py before it loads anything


def write_manifest(folder: Path) -> dict:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {
        "format": BUNDLE_FORMAT,
        "files": {
            p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in files
        },
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


# ----------------------------------------------------------------------------------------------
# Building


INT8_BITS = {"dynamic": 8, "blockwise": 9}  # blockwise: one fp32 scale per 32 int8 weights


def _runtime_config(model, processor, files: dict, parity, int8_scheme: str) -> dict:
    c = model.config
    return {
        "format": BUNDLE_FORMAT,
        "files": files,
        "image_size": c.vision.image_size,
        "image_mean": list(c.vision.image_mean),
        "image_std": list(c.vision.image_std),
        "image_token": c.image_token,
        "image_token_id": processor.image_token_id,
        "tokens_per_image": c.image_tokens_per_image,
        "image_block_ids": processor.image_block_ids(),  # what one image becomes in the prompt (layout included)
        "eos_token_id": processor.eos_token_id,
        "system_prompt": processor.system_prompt,
        "hidden_size": c.decoder.hidden_size,
        "num_layers": c.decoder.num_layers,
        "num_kv_heads": c.decoder.num_kv_heads,
        "head_dim": c.decoder.head_dim,
        "max_position_embeddings": c.decoder.max_position_embeddings,
        "parity_max_abs": parity,
        # for benchmark.py's roofline: bytes one decode step reads (weights; KV cache per token of context)
        "int8_scheme": int8_scheme if "decoder_int8" in files else None,
        "decode_weight_bytes": {
            "fp32": decode_roofline(c, 1.0, "fp32", "fp32", 0).weight_bytes,
            "int8": decode_roofline(c, 1.0, INT8_BITS[int8_scheme], "fp32", 0).weight_bytes,
        },
        "kv_bytes_per_token": kv_bytes_per_token(c.decoder, 32),
    }


def _readme(model, files: dict, parity: dict, gguf_file: str | None, name: str, int8_scheme: str) -> str:
    c = model.config
    descriptions = {
        "image_encoder": "vision encoder + projector (ONNX, fp32): pixels -> image embeddings",
        "decoder": "decoder with KV-cache inputs/outputs (ONNX, fp32)",
        "embed_tokens": "token-embedding matrix (numpy .npy, fp32)",
        "image_encoder_int8": f"vision graph, int8 weights ({int8_scheme.replace('_', '-')} quantisation)",
        "decoder_int8": f"decoder graph, int8 weights ({int8_scheme.replace('_', '-')} quantisation)",
        "gguf": "the decoder for llama.cpp (text only)",
        "tokenizer": "SmolLM2 tokenizer with the <image> token",
    }
    rows = [f"| `{path}` | {descriptions.get(key, key)} |" for key, path in files.items()]
    rows += [
        "| `bundle.json`, `config.json` | runtime settings, model config |",
        "| `run.py`, `benchmark.py` | standalone runner and benchmark |",
        "| `manifest.json` | size and sha256 of every file |",
    ]
    context = min(1024, c.decoder.max_position_embeddings)
    # What this bundle actually runs: ONNX graphs in fp32 (KV cache fp32 in run.py), their int8 copies, and
    # llama.cpp on the GGUF decoder (f16 KV cache by default), as written or after llama-quantize to Q4_0.
    variants = {"run.py (ONNX fp32)": ("fp32", "fp32")}
    if "decoder_int8" in files:
        variants["run.py --int8 (ONNX int8 weights)"] = (INT8_BITS[int8_scheme], "fp32")
    if gguf_file:
        fmt = gguf_file.split("-")[-1].removesuffix(".gguf")
        variants[f"llama.cpp {fmt} decoder + ONNX vision"] = (
            {"vision": "fp32", "projector": "fp32", "decoder": fmt.replace("f", "fp")},
            "fp16",
        )
        variants["llama.cpp Q4_0 decoder + ONNX vision"] = (
            {"vision": "fp32", "projector": "fp32", "decoder": "q4_0"},
            "fp16",
        )
    budget = deployment_table(c, variants, context_length=context)
    if gguf_file:
        gguf = (
            f"`{gguf_file}` is the language decoder alone, written with the `gguf` package in llama.cpp's "
            "`llama` layout (tokenizer and chat template included; checked by reading it back with "
            "transformers). With llama.cpp built for CUDA on the Jetson "
            "(`cmake -B build -DGGML_CUDA=ON && cmake --build build -j`):\n\n"
            f"```bash\n./build/bin/llama-cli -m {gguf_file} -ngl 99 -cnv   "
            "# text chat, all layers on the GPU\n"
            f"./build/bin/llama-quantize {gguf_file} decoder-q4_0.gguf Q4_0   # ~4.5 bits per weight\n```\n\n"
            "It answers text questions only: llama.cpp takes images through a separate `mmproj` file, which "
            "this bundle does not have (the ONNX image encoder plays that role for run.py)."
        )
    else:
        gguf = "This bundle was built without a GGUF file (`--gguf`)."
    parity_text = ", ".join(f"{k} {v:.1e}" for k, v in parity.items()) + " max abs difference (fp32)"
    params = model.num_parameters
    summary = (
        f"{params / 1e6:.1f}M parameters; {c.vision.image_size}px images -> {c.image_tokens_per_image} "
        f"image tokens; decoder {c.decoder.num_layers} layers x {c.decoder.hidden_size} wide, context "
        f"{c.decoder.max_position_embeddings}."
    )
    text = (TEMPLATES / "README.md").read_text()
    for key, value in {
        "NAME": name,
        "CREATED": datetime.date.today().isoformat(),
        "FILES": "\n".join(rows),
        "MODEL_SUMMARY": summary,
        "PARITY": parity_text,
        "GGUF": gguf,
        "CONTEXT": str(context),
        "BUDGET": budget,
    }.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def bundle_problems(config) -> list[str]:
    """What in a model's config the bundle cannot carry, each with what to do instead ([] when it can)."""
    problems = []
    if getattr(config, "image_splitting", False):
        problems.append("image splitting (config.image_splitting): the bundle's run.py writes one fixed image block per "
                        "image, not a tile grid; bundle a model trained without splitting, or export it with "
                        "save_idefics3 and run it in llama.cpp (python -m vlm_course export --format llama.cpp)")
    if getattr(config, "high_res", None) is not None:
        problems.append("a second, high-resolution vision branch (config.high_res): the image-encoder graph holds one "
                        "branch; bundle a single-branch model")
    fusion = getattr(getattr(config, "fusion", None), "kind", "autoregressive")
    if fusion != "autoregressive":
        problems.append(f"fusion kind {fusion!r}: the decoder graph reads image tokens in its input sequence only "
                        "(fusion.kind='autoregressive')")
    return problems


def build_bundle(
    model_dir_or_model,
    out_dir,
    int8: bool = False,
    gguf: bool = True,
    gguf_dtype: str = "f16",
    exporter: str = "torchscript",
    overwrite: bool = False,
    verify: bool = True,
    int8_scheme: str = "dynamic",
    processor=None,
) -> Path:
    """Export a trained VLM (a saved folder or a model) into a self-contained bundle folder; returns its path.

    int8: also write int8 graphs, quantised with `int8_scheme` ("dynamic" or "blockwise", see quantize.py).

    verify: run the exported fp32 graphs against PyTorch on random inputs and refuse to write the bundle if
    the logits differ by more than PARITY_TOLERANCE (the figures go into bundle.json and README.md).

    processor: the one the model was trained with (its system prompt goes into the bundle); default: a processor
    built from the model's config, with the default system prompt.
    """
    from ..processing import VLMProcessor

    out_dir = Path(out_dir)
    if int8_scheme not in INT8_BITS:
        raise ValueError(f"int8_scheme must be one of {sorted(INT8_BITS)}, got {int8_scheme!r}")
    source = None if isinstance(model_dir_or_model, nn.Module) else Path(model_dir_or_model)
    check_bundle_target(out_dir, overwrite, source)  # before any work: nothing is lost, nothing wasted
    model = load_model_for_export(model_dir_or_model)
    problems = bundle_problems(model.config)
    if problems:
        raise ValueError("this model cannot be bundled yet: " + "; ".join(problems))
    from ..weights import tokenizer_problem

    if tokenizer_problem(model.config.tokenizer):
        raise FileNotFoundError(tokenizer_problem(model.config.tokenizer))
    processor = processor or VLMProcessor.from_config(model.config)
    model.config.image_token_id = processor.image_token_id

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-building-"))
    try:
        export_onnx(model, tmp, exporter=exporter)
        files = {
            "image_encoder": IMAGE_ENCODER_FILE,
            "decoder": DECODER_FILE,
            "embed_tokens": EMBEDDINGS_FILE,
        }
        parity = {}
        if verify:
            result = check_onnx_parity(model, tmp)
            parity = {
                "image_embeds": result.image_embeds,
                "prefill_logits": result.prefill_logits,
                "decode_logits": result.decode_logits,
            }
            if max(parity.values()) > PARITY_TOLERANCE:
                raise RuntimeError(
                    f"the ONNX export differs from PyTorch by {max(parity.values()):.2e} "
                    f"(> {PARITY_TOLERANCE}): not writing a bundle; details {parity}"
                )
        if int8:
            for key in ("image_encoder", "decoder"):
                target = files[key].replace(".onnx", "_int8.onnx")
                quantize_int8(tmp / files[key], tmp / target, scheme=int8_scheme)
                files[f"{key}_int8"] = target
        processor.tokenizer.save_pretrained(tmp / "tokenizer")
        files["tokenizer"] = "tokenizer/tokenizer.json"
        gguf_file = None
        if gguf:
            gguf_file = f"decoder-{gguf_dtype}.gguf"
            export_gguf(model.decoder, processor.tokenizer, tmp / gguf_file, dtype=gguf_dtype)
            files["gguf"] = gguf_file
        model.config.save(tmp / "config.json")
        (tmp / "bundle.json").write_text(
            json.dumps(_runtime_config(model, processor, files, parity, int8_scheme), indent=2)
        )
        for script in ("run.py", "benchmark.py"):
            shutil.copy(TEMPLATES / script, tmp / script)
        (tmp / "README.md").write_text(_readme(model, files, parity, gguf_file, out_dir.name, int8_scheme))
        write_manifest(tmp)
        _swap_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def is_bundle_dir(folder) -> bool:
    """A folder build_bundle wrote: it has the bundle's manifest.json and bundle.json."""
    folder = Path(folder)
    return (folder / "manifest.json").is_file() and (folder / "bundle.json").is_file()


def _old_bundles(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.parent.glob(f".{out_dir.name}-old-*") if p.is_dir())


def check_bundle_target(out_dir, overwrite: bool, source=None) -> None:
    """Refuse, before any work, an --out that would lose data or could not be written.

    Only a previous bundle (or an empty folder) may be replaced, with overwrite; never the working directory or
    one of its parents, never the model being exported or a folder holding it; a file or an unwritable place is
    refused too. If an earlier replacement was killed between its two renames, the previous bundle is put back.
    """
    out_dir = Path(out_dir)
    if not out_dir.exists():
        for old in reversed(_old_bundles(out_dir)):  # interrupted swap: restore the last complete bundle
            if is_bundle_dir(old):
                os.replace(old, out_dir)
                break
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} is a file, not a folder: choose a folder path for the bundle")
    target = out_dir.resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise ValueError(
            f"--out {out_dir} is the working directory or one of its parents: a bundle needs a folder of its own, "
            f"e.g. --out {out_dir / 'bundle'}"
        )
    if source is not None:
        model = Path(source).resolve()
        if target == model or target in model.parents:
            raise ValueError(
                f"--out {out_dir} holds the model being exported ({source}): writing the bundle there would replace "
                f"it. Choose a folder of its own, e.g. --out {target.parent / (target.name + '-bundle')}"
            )
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(
                f"{out_dir} already exists: choose another --out or pass overwrite=True (--overwrite)"
            )
        if any(out_dir.iterdir()) and not is_bundle_dir(out_dir):
            raise FileExistsError(
                f"--out {out_dir} exists and is not an export bundle (no manifest.json + bundle.json): --overwrite "
                "replaces only a previous bundle. Choose another --out (or, if you really mean it, delete that "
                "folder yourself first)"
            )
    ancestor = next((p for p in [out_dir.parent, *out_dir.parent.parents] if p.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        raise FileExistsError(f"--out {out_dir}: {ancestor} is a file, so the bundle cannot be written there: "
                              "choose another --out")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir.parent):
            pass
    except OSError as err:
        raise ValueError(f"--out {out_dir}: {out_dir.parent} is not writable ({err.strerror or err}): choose a "
                         "folder you can write to, or fix its permissions") from err


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """The built bundle replaces out_dir: the old one is renamed aside, the new one renamed in, the old deleted.
    At every moment a complete bundle exists (out_dir, or .<name>-old-* which check_bundle_target restores)."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-old-"))
    os.replace(out_dir, old)  # onto the empty folder just made (POSIX rename allows it)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def verify_bundle(folder, check_hashes: bool = True) -> dict:
    """Check a bundle against its manifest (raises the runtime's BundleError naming missing/corrupt files)."""
    return load_runtime().verify_bundle(Path(folder), check_hashes=check_hashes)
