"""Export the VLM to ONNX: three files that a runtime without PyTorch can drive.

    image_encoder.onnx   pixel_values (N, 3, H, W) -> image_embeds (N, tokens_per_image, D)
                         the ViT and the projector as one graph
    decoder.onnx         inputs_embeds (B, T, D), attention_mask (B, P + T), position_ids (B, T),
                         past_key_i / past_value_i (B, kv_heads, P, head_dim) for every layer i
                         -> logits (B, T, V), present_key_i / present_value_i (B, kv_heads, P + T, head_dim)
    embed_tokens.npy     the token-embedding matrix (V, D)

The decoder takes *embeddings*, not token ids, so the runner can splice the image embeddings into the
prompt itself, exactly as `VisionLanguageModel.embed` does. One graph serves both phases of generation:
the prompt goes in with an empty past (P = 0), then each new token goes in with the cache the previous
call returned (T = 1). Empty tensors are legal in ONNX, so no separate prefill graph is needed (and the
weights are stored once).

Exporter: torch 2.13 has two. The TorchScript-based one (`dynamo=False`, deprecated but still shipped)
traces our plain-PyTorch modules in ~1 s and gives graphs that match to ~1e-7; the torch.export-based one
(`dynamo=True`, the default since torch 2.9) gives the same numbers but takes ~10x longer and needs the
total length as its own dynamic dimension. We default to the TorchScript exporter because it is fast and
has been reliable here; `exporter="dynamo"` switches (use it once TorchScript export is removed).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..decoder import Decoder, KVCache

IMAGE_ENCODER_FILE, DECODER_FILE, EMBEDDINGS_FILE = "image_encoder.onnx", "decoder.onnx", "embed_tokens.npy"
OPSET = 18  # onnxruntime >= 1.16 runs it; TensorRT 8.6+ (JetPack 6) parses it
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


# ----------------------------------------------------------------------------------------------
# Export-friendly wrappers: tensor operations only, no data-dependent Python branches.


class ImageEncoder(nn.Module):
    """pixel_values -> image embeddings in the decoder's width (`VisionLanguageModel.encode_images`)."""

    def __init__(self, vision: nn.Module, projector: nn.Module):
        super().__init__()
        self.vision, self.projector = vision, projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projector(self.vision(pixel_values))


def causal_padding_mask(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, 1, q_len, P + q_len) boolean mask from a (B, P + q_len) padding mask, built from shapes only.

    Same rule as `decoder.build_attention_mask`: a query sees keys at or before its own slot that are not
    padding, and always itself (a padding query would otherwise see nothing, and softmax over nothing is NaN).
    """
    key_slot = torch.cumsum(torch.ones_like(attention_mask), dim=-1) - 1  # 0 .. P+T-1, per row
    query_slot = key_slot[:, -q_len:]
    causal = key_slot[:, None, :] <= query_slot[:, :, None]
    mask = causal & attention_mask[:, None, :].bool()
    mask = mask | (key_slot[:, None, :] == query_slot[:, :, None])
    return mask[:, None]


class DecoderWithCache(nn.Module):
    """Our Decoder's forward pass with the KV cache as explicit inputs and outputs."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder
        self.num_layers = len(decoder.layers)

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        d = self.decoder
        cache = KVCache(self.num_layers)
        cache.keys, cache.values = list(past[0::2]), list(past[1::2])
        mask = causal_padding_mask(attention_mask, inputs_embeds.shape[1])
        cos, sin = d.rotary(position_ids)
        x = inputs_embeds
        for i, layer in enumerate(d.layers):
            x = layer(x, cos, sin, mask, cache, i)  # appends this call's keys/values to the cache
        logits = d.lm_head(d.norm(x))
        present = [t for pair in zip(cache.keys, cache.values) for t in pair]
        return (logits, *present)


def decoder_input_names(num_layers: int) -> list[str]:
    past = [f"past_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]
    return ["inputs_embeds", "attention_mask", "position_ids", *past]


def decoder_output_names(num_layers: int) -> list[str]:
    return ["logits", *[f"present_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]]


# ----------------------------------------------------------------------------------------------
# Export


def _export(module, args, path: Path, input_names, output_names, dynamic_axes, dynamic_shapes, exporter: str):
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # Shape checks in our modules turn into TracerWarnings ("treated as a constant"): the shapes they
        # check (channels, image size, grid) are fixed by the config, so freezing them is what we want.
        warnings.simplefilter("ignore")
        # The two exporters name their variable sizes differently: per-input axes, or torch.export's shapes.
        if exporter == "torchscript":
            options = dict(dynamic_axes=dynamic_axes, dynamo=False)
        else:
            options = dict(dynamic_shapes=dynamic_shapes, dynamo=True, external_data=False, verbose=False)
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                          opset_version=OPSET, **options)
    return path


def export_image_encoder(model, path, exporter: str = "torchscript") -> Path:
    """Write the ViT + projector graph: pixel_values (N, 3, S, S) -> image_embeds (N, tokens, D)."""
    size = model.config.vision.image_size
    example = torch.randn(2, 3, size, size)  # batch 2: a batch of 1 could be specialised away
    return _export(
        ImageEncoder(model.vision, model.projector),
        (example,),
        Path(path),
        ["pixel_values"],
        ["image_embeds"],
        dynamic_axes={"pixel_values": {0: "num_images"}, "image_embeds": {0: "num_images"}},
        dynamic_shapes=({0: torch.export.Dim("num_images")},),
        exporter=exporter,
    )


def export_decoder(decoder: Decoder, path, exporter: str = "torchscript") -> Path:
    """Write the decoder graph with KV-cache inputs and outputs (see the module docstring for the names)."""
    cfg = decoder.cfg
    n = cfg.num_layers
    batch, new, past = 2, 3, 4  # distinct sizes, none 0 or 1, so no dimension is mistaken for a constant
    param = next(decoder.parameters())
    inputs_embeds = torch.randn(batch, new, cfg.hidden_size, dtype=param.dtype)
    attention_mask = torch.ones(batch, past + new, dtype=torch.long)
    position_ids = torch.arange(past, past + new).expand(batch, new)
    cache = [
        torch.randn(batch, cfg.num_kv_heads, past, cfg.head_dim, dtype=param.dtype) for _ in range(2 * n)
    ]
    inputs, outputs = decoder_input_names(n), decoder_output_names(n)
    axes = {
        "inputs_embeds": {0: "batch", 1: "new"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "new"},
        "logits": {0: "batch", 1: "new"},
    }
    axes.update({name: {0: "batch", 2: "past"} for name in inputs[3:]})
    axes.update({name: {0: "batch", 2: "total"} for name in outputs[1:]})
    b, t, p, total = (torch.export.Dim(s) for s in ("batch", "new", "past", "total"))
    shapes = (
        {0: b, 1: t},
        {0: b, 1: total},
        {0: b, 1: t},
        ({0: b, 2: p},) * (2 * n),
    )  # *past: one tuple argument
    return _export(
        DecoderWithCache(decoder),
        (inputs_embeds, attention_mask, position_ids, *cache),
        Path(path),
        inputs,
        outputs,
        axes,
        shapes,
        exporter,
    )


def export_embeddings(decoder: Decoder, path) -> Path:
    """The token-embedding matrix as .npy (float32): the runner looks rows up with plain numpy indexing."""
    path = Path(path)
    np.save(path, decoder.embed_tokens.weight.detach().float().cpu().numpy())
    return path


def export_onnx(model, out_dir, exporter: str = "torchscript") -> dict[str, Path]:
    """All three files into out_dir; returns {"image_encoder", "decoder", "embed_tokens"} -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    return {
        "image_encoder": export_image_encoder(model, out_dir / IMAGE_ENCODER_FILE, exporter),
        "decoder": export_decoder(model.decoder, out_dir / DECODER_FILE, exporter),
        "embed_tokens": export_embeddings(model.decoder, out_dir / EMBEDDINGS_FILE),
    }


# ----------------------------------------------------------------------------------------------
# Running and checking


def make_session(path, provider: str = "cpu"):
    """An onnxruntime session on the named provider ('cpu', 'cuda', 'tensorrt'); a clear error if absent."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}: choose one of {sorted(PROVIDERS)}")
    wanted, available = PROVIDERS[provider], ort.get_available_providers()
    if wanted not in available:
        raise RuntimeError(
            f"onnxruntime provider {wanted} is not available in this build (available: {available}). "
            "Install onnxruntime-gpu (on a Jetson: the JetPack wheel from NVIDIA's Jetson AI Lab index) "
            "or use provider 'cpu'."
        )
    # Keep the CPU provider as a fallback for the few operators a GPU provider does not implement.
    providers = [wanted] if wanted == "CPUExecutionProvider" else [wanted, "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), providers=providers)


@dataclass
class OnnxParity:
    """Largest absolute differences between onnxruntime and PyTorch on the same inputs."""

    image_embeds: float
    prefill_logits: float
    decode_logits: float
    present_kv: float

    @property
    def worst_logits(self) -> float:
        return max(self.prefill_logits, self.decode_logits)


def _decoder_feeds(inputs_embeds, attention_mask, position_ids, past: list[torch.Tensor]) -> dict:
    names = decoder_input_names(len(past) // 2)
    values = [inputs_embeds, attention_mask, position_ids, *past]
    return {name: v.detach().cpu().numpy() for name, v in zip(names, values)}


@torch.no_grad()
def check_onnx_parity(
    model, onnx_dir, prompt_len: int = 12, num_images: int = 2, seed: int = 0, provider: str = "cpu"
) -> OnnxParity:
    """Run the exported graphs and the PyTorch model on the same random inputs; return max abs differences.

    The decoder is checked in both phases: a left-padded prefill of two rows (empty past), then one decode
    step fed the cache that onnxruntime returned.
    """
    onnx_dir = Path(onnx_dir)
    model = model.float().eval()
    generator = torch.Generator().manual_seed(seed)
    size, cfg = model.config.vision.image_size, model.config.decoder
    pixel_values = torch.randn(num_images, 3, size, size, generator=generator)
    vision = make_session(onnx_dir / IMAGE_ENCODER_FILE, provider)
    image_embeds = vision.run(None, {"pixel_values": pixel_values.numpy()})[0]
    image_diff = float(np.abs(image_embeds - model.encode_images(pixel_values).numpy()).max())

    decoder = make_session(onnx_dir / DECODER_FILE, provider)
    batch = 2
    embeds = torch.randn(batch, prompt_len, cfg.hidden_size, generator=generator) * 0.05
    mask = torch.ones(batch, prompt_len, dtype=torch.long)
    mask[1, :3] = 0  # row 1 is left-padded, as in a generation batch
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    empty = [torch.zeros(batch, cfg.num_kv_heads, 0, cfg.head_dim)] * (2 * cfg.num_layers)
    ort_out = decoder.run(None, _decoder_feeds(embeds, mask, positions, empty))
    cache = KVCache(cfg.num_layers)
    ref = model.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, kv_cache=cache)
    real = mask.bool()  # padding positions are never read, so compare real tokens only
    prefill_diff = float(np.abs(ort_out[0] - ref.logits.numpy())[real.numpy()].max())
    ref_present = [t for pair in zip(cache.keys, cache.values) for t in pair]
    kv_diff = max(float(np.abs(o - r.numpy()).max()) for o, r in zip(ort_out[1:], ref_present))

    step = torch.randn(batch, 1, cfg.hidden_size, generator=generator) * 0.05
    mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
    position = positions[:, -1:] + 1
    ort_past = [torch.from_numpy(t) for t in ort_out[1:]]
    ort_step = decoder.run(None, _decoder_feeds(step, mask, position, ort_past))
    ref_step = model.decoder(inputs_embeds=step, attention_mask=mask, position_ids=position, kv_cache=cache)
    decode_diff = float(np.abs(ort_step[0] - ref_step.logits.numpy()).max())
    return OnnxParity(image_diff, prefill_diff, decode_diff, kv_diff)
