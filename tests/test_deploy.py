"""Deployment: LoRA merge, ONNX export parity, int8, GGUF round trip, memory budget, roofline, the bundle.

Everything runs on the `tiny` profile (random weights, real SmolLM2 tokenizer). The tiny decoder's weights
are re-drawn with a larger spread (std 0.3) so that greedy decoding produces varied tokens with clear
top-1 margins: with the default 0.02 init it repeats one token, and "same tokens as PyTorch" would prove
little. One slow test exports the real SmolLM2-135M to GGUF.
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from vlm_course.config import get_profile
from vlm_course.decoder import Decoder, KVCache
from vlm_course.deploy import (
    ORIN_NANO_8GB,
    ORIN_NANO_SUPER,
    build_bundle,
    check_gguf_roundtrip,
    check_onnx_parity,
    decode_roofline,
    estimate_memory,
    export_gguf,
    export_main,
    load_model_for_export,
    load_runtime,
    make_session,
    measure_memory_bandwidth,
    merge_lora_adapters,
    verify_bundle,
)
from vlm_course.deploy.budget import decoder_parameters, projector_parameters, vision_parameters
from vlm_course.deploy.gguf_export import permute_for_llama_cpp
from vlm_course.processing import VLMProcessor, load_tokenizer
from vlm_course.vlm import VisionLanguageModel

QUESTION = "What colour is the shape?"


def spread_weights(model: nn.Module, std: float = 0.3, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith("vision."):
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model


def make_tiny_model() -> VisionLanguageModel:
    torch.manual_seed(0)
    model = VisionLanguageModel(get_profile("tiny").config).eval()
    return spread_weights(model)


def picture(colour, size=(80, 60)) -> Image.Image:
    image = Image.new("RGB", size, (235, 235, 235))
    image.paste(Image.new("RGB", (40, 30), colour), (10, 10))
    return image


@pytest.fixture(scope="module")
def tiny():
    model = make_tiny_model()
    processor = VLMProcessor.from_config(model.config)
    return model, processor


@pytest.fixture(scope="module")
def saved_model(tiny, tmp_path_factory):
    return tiny[0].save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def bundle(saved_model, tmp_path_factory):
    """Built through the CLI entry point, as a user would: int8 graphs and an f16 GGUF included."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-bundle"
    assert export_main(["--model", str(saved_model), "--out", str(out), "--int8"]) == 0
    return out


def torch_greedy(model, processor, image, question=QUESTION, max_new_tokens=12) -> list[int]:
    batch = processor(image, question)
    new = model.generate(
        batch["input_ids"],
        batch["pixel_values"],
        batch["attention_mask"],
        max_new_tokens=max_new_tokens,
        eos_token_id=processor.eos_token_id,
    )
    return new[0].tolist()


# ----------------------------------------------------------------------------------------------
# LoRA merge

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config():
    from peft import LoraConfig

    # init_lora_weights=False: B is random, not zero, so the adapters change the output.
    return LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)


def test_merge_lora_injected_in_place_matches_wrapped_model():
    from peft import inject_adapter_in_model

    model = make_tiny_model()
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        base_logits = model.decoder(input_ids=ids).logits
        inject_adapter_in_model(lora_config(), model.decoder)
        wrapped_logits = model.decoder(input_ids=ids).logits
    assert (wrapped_logits - base_logits).abs().max() > 1e-2, "the adapters should change the output"
    merged = merge_lora_adapters(model)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert type(merged.decoder.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        merged_logits = merged.decoder(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, wrapped_logits, atol=1e-4, rtol=1e-4)


def test_merge_lora_unwraps_a_peft_model():
    from peft import get_peft_model

    class Wrapper(nn.Module):  # get_peft_model wants a module with a forward
        def __init__(self, decoder):
            super().__init__()
            self.decoder = decoder

        def forward(self, input_ids):
            return self.decoder(input_ids=input_ids).logits

    peft_model = get_peft_model(Wrapper(make_tiny_model().decoder), lora_config())
    ids = torch.randint(0, 1000, (1, 7))
    with torch.no_grad():
        expected = peft_model(ids)
    merged = merge_lora_adapters(peft_model)
    assert isinstance(merged, Wrapper)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), expected, atol=1e-4, rtol=1e-4)


def test_merge_without_lora_changes_nothing():
    model = make_tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merge_lora_adapters(model)
    assert merged is model
    assert all(torch.equal(before[k], v) for k, v in merged.state_dict().items())


# ----------------------------------------------------------------------------------------------
# ONNX


def test_onnx_export_matches_pytorch(bundle, tiny):
    """Bundle graphs vs PyTorch: vision, a padded batch-2 prefill with an empty cache, one decode step."""
    parity = check_onnx_parity(tiny[0], bundle)
    # fp32 through different kernels (and summation orders): the differences are rounding, ~1e-7 on
    # logits of ~1-10.
    assert parity.image_embeds < 1e-4
    assert parity.prefill_logits < 1e-4
    assert parity.decode_logits < 1e-4
    assert parity.present_kv < 1e-4
    recorded = json.loads((bundle / "bundle.json").read_text())["parity_max_abs"]
    assert max(recorded.values()) < 1e-4


def test_missing_provider_is_a_clear_error(bundle):
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has TensorRT")
    with pytest.raises(RuntimeError, match="TensorrtExecutionProvider is not available.*onnxruntime-gpu"):
        make_session(bundle / "decoder.onnx", provider="tensorrt")
    runtime = load_runtime()
    with pytest.raises(runtime.BundleError, match="not available.*--provider cpu"):
        runtime.VLMRunner(bundle, provider="tensorrt", check_hashes=False)


# ----------------------------------------------------------------------------------------------
# int8


def test_int8_graphs_are_smaller_and_close(bundle, tiny):
    runtime = load_runtime()
    fp32 = runtime.VLMRunner(bundle, check_hashes=False)
    int8 = runtime.VLMRunner(bundle, int8=True, verify=False)
    sizes = {name: (bundle / name).stat().st_size for name in ("decoder.onnx", "decoder_int8.onnx")}
    assert sizes["decoder_int8.onnx"] < 0.35 * sizes["decoder.onnx"]  # int8 weights: ~4x smaller
    ids = fp32.prompt(QUESTION)
    embeds = fp32.embed(ids, fp32.encode_images(fp32.pixel_values([picture((200, 30, 30))])))
    logits32, _ = fp32.decoder_step(embeds, fp32.empty_cache(), 0)
    logits8, _ = int8.decoder_step(embeds, int8.empty_cache(), 0)
    error = np.abs(logits8 - logits32).max() / np.abs(logits32).max()
    assert 0 < error < 0.1, f"int8 relative logit error {error}"


def test_blockwise_int8_is_smaller_and_closer_than_dynamic(bundle, tmp_path):
    from vlm_course.deploy import quantize_int8

    runtime = load_runtime()
    fp32 = runtime.VLMRunner(bundle, check_hashes=False)
    path = quantize_int8(bundle / "decoder.onnx", tmp_path / "decoder_blockwise.onnx", scheme="blockwise")
    assert path.stat().st_size < 0.35 * (bundle / "decoder.onnx").stat().st_size
    ids = fp32.prompt(QUESTION)
    embeds = fp32.embed(ids, fp32.encode_images(fp32.pixel_values([picture((200, 30, 30))])))
    ref, _ = fp32.decoder_step(embeds, fp32.empty_cache(), 0)
    errors = {}
    for name, graph in (("dynamic", bundle / "decoder_int8.onnx"), ("blockwise", path)):
        fp32.decoder = make_session(graph)
        logits, _ = fp32.decoder_step(embeds, fp32.empty_cache(), 0)
        errors[name] = np.abs(logits - ref).max()
    # a scale per 32 activations keeps more precision than one scale per tensor
    assert 0 < errors["blockwise"] < errors["dynamic"]
    with pytest.raises(ValueError, match="scheme"):
        quantize_int8(bundle / "decoder.onnx", tmp_path / "x.onnx", scheme="int4")


def test_compare_int8_accuracy_reports_sizes_and_scores(bundle):
    from vlm_course.deploy import compare_int8_accuracy

    rows = [
        {
            "images": [picture(c)],
            "texts": [{"user": "What colour is the shape?", "assistant": "red"}],
            "source": "shapes",
        }
        for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))
    ]
    report = compare_int8_accuracy(bundle, rows, max_new_tokens=6, progress=False)
    assert report.num_questions == 3 and len(report.rows) == 3
    assert report.size_ratio < 0.5
    assert 0 <= report.same_answer <= 1 and 0 <= report.fp32_score <= 1
    assert "held-out questions" in report.summary()


# ----------------------------------------------------------------------------------------------
# GGUF


def test_llama_cpp_permutation_pairs_rotate_half_dimensions():
    head_dim, heads = 8, 2
    rows = torch.arange(heads * head_dim, dtype=torch.float32)[:, None].numpy()
    permuted = permute_for_llama_cpp(rows, heads)[:, 0]
    # rotate-half pairs row j with j + d/2 inside each head; llama.cpp wants them side by side.
    assert permuted[:head_dim].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert permuted[head_dim:].tolist() == [8, 12, 9, 13, 10, 14, 11, 15]


def test_gguf_f32_round_trip_through_transformers(tiny, tmp_path):
    decoder, tokenizer = tiny[0].decoder, tiny[1].tokenizer
    path = export_gguf(decoder, tokenizer, tmp_path / "tiny-f32.gguf", dtype="f32")
    result = check_gguf_roundtrip(decoder, tokenizer, path, "f32")
    assert result.weights_equal, "transformers' GGUF reader did not give back our weights (q/k permutation?)"
    assert result.tokenizer_equal
    assert result.max_abs_logits < 1e-5


def test_gguf_f16_round_trip_from_the_bundle(bundle, tiny):
    decoder, tokenizer = tiny[0].decoder, tiny[1].tokenizer
    # (the tokenizer metadata is the same as in the f32 test; reading it back costs seconds, so skip it here)
    result = check_gguf_roundtrip(
        decoder, tokenizer, bundle / "decoder-f16.gguf", "f16", check_tokenizer=False
    )
    assert result.weights_equal  # equal to our weights rounded to f16
    assert result.max_abs_logits < 1e-5  # same rounded weights, same maths
    # vs fp32: only f16 rounding (relative 2^-11 per weight) remains
    assert 0 < result.max_abs_vs_fp32 < 1e-2 * result.logits_scale


def test_gguf_rejects_unknown_dtype(tiny, tmp_path):
    with pytest.raises(ValueError, match="f32.*f16"):
        export_gguf(tiny[0].decoder, tiny[1].tokenizer, tmp_path / "x.gguf", dtype="q4_0")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_gguf_round_trip_real_smollm2(smollm2, tmp_path):
    decoder, _ = smollm2
    tokenizer = load_tokenizer()
    path = export_gguf(decoder, tokenizer, tmp_path / "smollm2-f16.gguf", dtype="f16")
    # same tokenizer as the tiny tests, where its round trip is checked; here the weights and logits
    result = check_gguf_roundtrip(decoder, tokenizer, path, "f16", check_tokenizer=False)
    assert result.weights_equal
    assert result.max_abs_logits < 1e-3  # 30 layers of the same f16-rounded weights, fp32 maths
    assert result.max_abs_vs_fp32 < 0.05 * result.logits_scale


# ----------------------------------------------------------------------------------------------
# Memory budget and roofline


@pytest.mark.parametrize("profile", ["tiny", "smol", "nano"])
def test_parameter_counts_match_the_modules(profile):
    config = get_profile(profile).config
    with torch.device("meta"):  # shapes only, even for the 222M-parameter nano
        model = VisionLanguageModel(config)
    assert vision_parameters(config.vision) == sum(p.numel() for p in model.vision.parameters())
    assert projector_parameters(
        config.projector, config.vision.hidden_size, config.decoder.hidden_size
    ) == sum(p.numel() for p in model.projector.parameters())
    assert decoder_parameters(config.decoder) == model.decoder.num_parameters


def test_budget_weights_and_kv_cache_equal_real_tensor_bytes(tiny):
    model = tiny[0]
    config = model.config
    context, batch = 37, 3
    budget = estimate_memory(config, weights="fp32", kv_bits="fp32", context_length=context, batch=batch)
    assert budget.weight_bytes == sum(
        p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
    )
    cache = KVCache(config.decoder.num_layers)
    with torch.no_grad():
        model.decoder(input_ids=torch.randint(0, 100, (batch, context)), kv_cache=cache)
    assert budget.kv_cache == sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
    half = estimate_memory(
        config,
        weights={"vision": "fp32", "projector": "fp32", "decoder": "fp16"},
        kv_bits="fp16",
        context_length=context,
        batch=batch,
    )
    assert half.weights["decoder"] == budget.weights["decoder"] / 2 and half.kv_cache == budget.kv_cache / 2


def test_budget_fits_verdict_on_orin_nano():
    config = get_profile("nano").config  # nanoVLM-222M
    small = estimate_memory(config, weights="fp16", context_length=1024, device=ORIN_NANO_8GB)
    fit = small.fits(ORIN_NANO_8GB)
    assert fit.fits and fit.headroom_bytes > 3e9  # ~0.45 GB of fp16 weights in 5.2 GB
    huge = estimate_memory(config, weights="fp32", context_length=8192, batch=32, device=ORIN_NANO_8GB)
    verdict = huge.fits("orin-nano")
    assert not verdict.fits and verdict.headroom_bytes < 0
    assert "does NOT fit" in str(verdict) and "total" in huge.table()
    with pytest.raises(ValueError, match="unknown weight format"):
        estimate_memory(config, weights="fp8")


def test_roofline_by_hand_and_its_trends():
    config = get_profile("tiny").config
    # tiny decoder: 49152 x 64 tied embedding (read once, as the head) + 2 layers of
    # (2*64 norms + 64*64*2 q,o + 64*32*2 k,v + 3*64*128 MLP = 36,992) + 64 final norm = 3,219,776.
    assert decoder_parameters(config.decoder) == 3_219_776
    roof = decode_roofline(config, 1e9, weights="fp32", kv_bits="fp32", context_length=100)
    kv = 2 * 2 * 2 * 16 * 4 * 100  # K and V x layers x kv_heads x head_dim x bytes x tokens
    assert roof.bytes_per_step == 3_219_776 * 4 + kv
    assert roof.tokens_per_s == pytest.approx(1e9 / (3_219_776 * 4 + kv))
    nano = get_profile("nano").config
    fp16 = decode_roofline(nano, ORIN_NANO_8GB, "fp16")
    assert decode_roofline(nano, ORIN_NANO_SUPER, "fp16").tokens_per_s / fp16.tokens_per_s == pytest.approx(
        102 / 68
    )
    assert decode_roofline(nano, ORIN_NANO_8GB, "q4_0").tokens_per_s > fp16.tokens_per_s
    assert decode_roofline(nano, ORIN_NANO_8GB, "fp16", context_length=4096).tokens_per_s < fp16.tokens_per_s
    assert decode_roofline(nano, ORIN_NANO_8GB, "fp16", batch=8).tokens_per_s > fp16.tokens_per_s


def test_measure_memory_bandwidth_is_plausible():
    for kind in ("copy", "read"):
        bandwidth = measure_memory_bandwidth(size_mb=64, repeats=2, kind=kind)
        assert 1e8 < bandwidth < 2e12  # 0.1 GB/s .. 2 TB/s


# ----------------------------------------------------------------------------------------------
# The bundle


def test_bundle_has_every_file_listed_in_its_manifest(bundle):
    manifest = verify_bundle(bundle)
    listed = set(manifest["files"])
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert listed == on_disk
    for name in (
        "image_encoder.onnx",
        "decoder.onnx",
        "embed_tokens.npy",
        "decoder_int8.onnx",
        "decoder-f16.gguf",
        "tokenizer/tokenizer.json",
        "run.py",
        "benchmark.py",
        "README.md",
    ):
        assert name in listed
    readme = (bundle / "README.md").read_text()
    assert "{{" not in readme and "Orin Nano" in readme and "llama-cli" in readme


def test_run_py_matches_pytorch_greedy_tokens(bundle, tiny, tmp_path):
    """The standalone runner, in a fresh interpreter, generates exactly the PyTorch model's tokens."""
    model, processor = tiny
    answers = {}
    for colour in ((200, 30, 30), (30, 30, 200)):
        image_path = tmp_path / f"{colour[0]}.png"
        picture(colour).save(image_path)
        expected = torch_greedy(model, processor, Image.open(image_path))
        result = subprocess.run(
            [
                sys.executable,
                str(bundle / "run.py"),
                "--image",
                str(image_path),
                "--question",
                QUESTION,
                "--max-new-tokens",
                "12",
                "--print-ids",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        text, ids = result.stdout.rstrip("\n").rsplit("\n", 1)
        assert json.loads(ids) == expected
        assert text.strip() == processor.decode(expected)
        answers[colour] = expected
    assert len(set(map(tuple, answers.values()))) == 2, "the two images should lead to different answers"


def test_run_py_imports_no_torch_or_vlm_course(bundle):
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import run; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'vlm_course', 'transformers')]; "
        "runner = run.VLMRunner(sys.argv[1]); "
        "bad += [m for m in sys.modules if m.split('.')[0] in ('torch', 'vlm_course', 'transformers')]; "
        "print(sorted(set(bad)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(bundle)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_prompt_of_run_py_equals_the_processor(bundle, tiny):
    runner = load_runtime().VLMRunner(bundle, check_hashes=False)
    processor = tiny[1]
    for question in (QUESTION, "Compare <image> with this one."):
        expected = processor.encode_prompt(question, [picture((1, 2, 3))])["input_ids"].tolist()
        assert runner.prompt(question, 1) == expected
    pixels = runner.pixel_values([picture((10, 200, 30), size=(97, 41))])
    torch.testing.assert_close(
        torch.from_numpy(pixels[0]), processor.image_transform(picture((10, 200, 30), size=(97, 41)))
    )


def test_benchmark_py_reports_speed_and_memory(bundle):
    result = subprocess.run(
        [sys.executable, str(bundle / "benchmark.py"), "--runs", "1", "--new-tokens", "5", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["new_tokens"] == 5 and report["decode_tokens_per_s"] > 0
    assert 20 < report["peak_rss_mb"] < 4000
    assert report["roofline_tokens_per_s"] > 0 and report["bandwidth_gb_s"] > 0.1


def _run(bundle_dir, image):
    return subprocess.run(
        [sys.executable, str(bundle_dir / "run.py"), "--image", str(image), "--question", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bundle_missing_or_corrupt_file_is_named(bundle, tmp_path):
    image = tmp_path / "x.png"
    picture((0, 0, 0)).save(image)
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    (copy / "decoder.onnx").unlink()
    result = _run(copy, image)
    assert result.returncode == 2
    assert "missing decoder.onnx" in result.stderr and "Traceback" not in result.stderr

    shutil.copy(bundle / "decoder.onnx", copy / "decoder.onnx")
    data = bytearray((copy / "embed_tokens.npy").read_bytes())
    data[-1] ^= 0xFF  # same size, one byte flipped: only the hash can tell
    (copy / "embed_tokens.npy").write_bytes(bytes(data))
    result = _run(copy, image)
    assert result.returncode == 2 and "embed_tokens.npy differ from manifest.json" in result.stderr

    (copy / "manifest.json").unlink()
    assert "no manifest.json" in _run(copy, image).stderr

    result = _run(bundle, tmp_path / "no-such-image.png")
    assert result.returncode == 2 and "could not read the image" in result.stderr


def test_export_refuses_bad_checkpoints(saved_model, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_model_for_export(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="lacks config.json, model.safetensors"):
        load_model_for_export(empty)

    mismatched = tmp_path / "mismatched"
    shutil.copytree(saved_model, mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    config["decoder"]["intermediate_size"] = 256
    (mismatched / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not belong to these weights"):
        load_model_for_export(mismatched)

    adapter = tmp_path / "adapter"
    shutil.copytree(saved_model, adapter)
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="LoRA adapter"):
        load_model_for_export(adapter)

    diverged = make_tiny_model()
    with torch.no_grad():
        diverged.projector.proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        load_model_for_export(diverged)

    # The CLI turns these into one line on stderr and exit code 2, no traceback.
    assert export_main(["--model", str(mismatched), "--out", str(tmp_path / "b")]) == 2
    assert "does not belong" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_build_bundle_will_not_overwrite_by_accident(bundle, tiny):
    with pytest.raises(FileExistsError, match="already exists"):
        build_bundle(tiny[0], bundle)


def test_onnx_decoder_cache_round_trip_matches_pytorch_generation(tiny, tmp_path):
    """A bare decoder exported on its own: 20 greedy steps through onnxruntime == Decoder.generate."""
    from vlm_course.deploy.onnx_export import decoder_input_names, export_decoder

    decoder = Decoder(get_profile("tiny").config.decoder).eval()
    spread_weights(decoder, seed=1)
    path = export_decoder(decoder, tmp_path / "decoder.onnx")
    session = make_session(path)
    prompt = torch.randint(0, 5000, (1, 6))
    expected = decoder.generate(input_ids=prompt, max_new_tokens=20)[0].tolist()
    cfg = decoder.cfg
    embed = decoder.embed_tokens.weight.detach().numpy()
    past = [np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)] * (2 * cfg.num_layers)
    step_ids, tokens, seen = prompt[0].tolist(), [], 0
    for _ in range(20):
        feeds = dict(
            zip(
                decoder_input_names(cfg.num_layers),
                [
                    embed[step_ids][None],
                    np.ones((1, seen + len(step_ids)), np.int64),
                    np.arange(seen, seen + len(step_ids))[None],
                    *past,
                ],
            )
        )
        logits, *past = session.run(None, feeds)
        seen += len(step_ids)
        step_ids = [int(logits[0, -1].argmax())]
        tokens.append(step_ids[0])
    assert tokens == expected


def test_demo_layout_bundle_generates_pytorch_tokens(tmp_path):
    """The demo's image side (block places in words, two tokens per block, count tokens) and its QLoRA decoder,
    merged and bundled: run.py builds the processor's prompt and generates the merged PyTorch model's tokens."""
    from vlm_course import demo
    from vlm_course.deploy import load_model_for_export

    torch.manual_seed(0)
    model, processor = demo.build_model("tiny", demo.quick_recipe(demo.DemoRecipe()))
    spread_weights(model.projector, std=0.3, seed=1)
    model = load_model_for_export(model)  # LoRA merged into dequantised float layers
    out = build_bundle(model, tmp_path / "demo-bundle", gguf=False, processor=processor)
    runner = load_runtime().VLMRunner(out, check_hashes=False)
    assert runner.config["system_prompt"] is None  # the demo trains without one: so must the bundle prompt
    for seed in (0, 1):
        image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        assert runner.prompt(QUESTION, 1) == processor.encode_prompt(QUESTION, [image])["input_ids"].tolist()
        pixels = processor.preprocess_images([image])
        with torch.no_grad():
            np.testing.assert_allclose(runner.encode_images(pixels.numpy()), model.encode_images(pixels).numpy(),
                                       atol=1e-4)  # count tokens included: the same tallies in the graph
        assert runner.generate_ids([image], QUESTION, max_new_tokens=12) == torch_greedy(model, processor, image)


def test_bundle_refuses_what_its_graphs_cannot_carry(tmp_path):
    """Image splitting, a second vision branch and cross-attention fusion each need more than the bundle's three
    graphs and fixed image block: build_bundle says so (and what to do) before writing anything."""
    import dataclasses

    from vlm_course.config import FusionConfig, HighResConfig
    from vlm_course.deploy.bundle import bundle_problems

    base = get_profile("tiny").config
    assert bundle_problems(base) == []
    cases = {
        "image splitting": dataclasses.replace(base, image_layout="idefics3", image_splitting=True,
                                               projector=dataclasses.replace(base.projector, tokens_per_block=1,
                                                                             count_labels=())),
        "high-resolution": dataclasses.replace(base, high_res=HighResConfig()),
        "cross_attention": dataclasses.replace(base, fusion=FusionConfig(kind="cross_attention")),
    }
    for needle, config in cases.items():
        problems = bundle_problems(config)
        assert len(problems) == 1 and needle in problems[0], (needle, problems)
    model = VisionLanguageModel(cases["cross_attention"])
    with pytest.raises(ValueError, match="cannot be bundled yet.*fusion kind"):
        build_bundle(model, tmp_path / "bundle", gguf=False)
    assert not (tmp_path / "bundle").exists()
