"""The vision encoder: a Vision Transformer as in SigLIP.

    pixels (B, 3, H, W)
      -> PatchEmbedding: a conv with kernel = stride = patch size cuts the image into patches and projects
         each to D numbers (the same as reshaping into patches and applying one linear layer)
      -> + learned position embeddings (one vector per patch position; SigLIP has no CLS token)
      -> L pre-LayerNorm transformer blocks: x + Attn(LN(x)), then x + MLP(LN(x))
      -> a final LayerNorm ("post_layernorm")
    patch features (B, N, D)

SigLIP also has an attention-pooling head for its contrastive loss; a VLM does not use it (nanoVLM keeps
all N patch vectors), so we do not build it.
"""

from __future__ import annotations

import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import weight_files
from .config import VisionConfig
from .registry import register_vision


class PatchEmbedding(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        check_pixel_values(pixel_values, self.cfg)
        # float64 (numpy's default) is unambiguous: compute in the encoder's own dtype.
        pixel_values = pixel_values.to(self.patch_embedding.weight.dtype)
        x = self.patch_embedding(pixel_values)  # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order
        return x + self.position_embedding.weight


def check_pixel_values(pixel_values: torch.Tensor, cfg: VisionConfig) -> None:
    """Fail with a message that says what to do, instead of a shape error deep inside a conv."""
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be (batch, channels, height, width), got shape {tuple(pixel_values.shape)}")
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values are {pixel_values.dtype}, not normalised floats: pass the image through the processor "
            "(processor.preprocess_images or processor(images, questions)), which scales and normalises it"
        )
    if torch.isnan(pixel_values).any() or torch.isinf(pixel_values).any():
        raise ValueError("pixel_values contain NaN or infinite values: the image data is broken; rebuild them "
                         "from the image with the processor")
    _, c, h, w = pixel_values.shape
    if c != cfg.num_channels:
        raise ValueError(
            f"pixel_values has {c} channels but the encoder expects {cfg.num_channels}: convert the image to RGB "
            "first (the processor does this for L, LA, RGBA, P, CMYK and I;16 images)"
        )
    if h < cfg.patch_size or w < cfg.patch_size:
        raise ValueError(f"the image ({h}x{w}) is smaller than one {cfg.patch_size}px patch")
    if (h, w) != (cfg.image_size, cfg.image_size):
        raise ValueError(
            f"pixel_values are {h}x{w} but the encoder was built for {cfg.image_size}x{cfg.image_size} (its position "
            "embeddings are learned per patch position): resize with the processor's image transform"
        )


class VisionAttention(nn.Module):
    """Multi-head self-attention with biases, as SigLIP's (no mask: every patch sees every patch)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(self.q_proj(x)), self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))
        # softmax(q k^T / sqrt(head_dim)) v, fused: PyTorch picks a flash or memory-efficient kernel.
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(x.shape)
        return self.out_proj(out)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SigLIP uses the tanh approximation of GELU ("gelu_pytorch_tanh").
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    """Pre-LN transformer block: normalise, transform, add back (the residual stream stays unnormalised)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


@register_vision("siglip")  # the kind configs name by default (vision.kind)
class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = PatchEmbedding(cfg)
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.apply(_init_weights)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False):
        x = self.embeddings(pixel_values)
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x)
            hidden_states.append(x)
        x = self.post_layernorm(x)
        return (x, hidden_states) if output_hidden_states else x

    def resized(self, image_size: int) -> "VisionEncoder":
        """A copy for another image size: the learned position embeddings are resampled (bicubic) to the new
        patch grid, as DeiT and timm do when fine-tuning a ViT at a higher resolution; every other weight is
        shared in value. The patch size stays."""
        import dataclasses

        import torch.nn.functional as F

        cfg = dataclasses.replace(self.cfg, image_size=image_size)
        new = VisionEncoder(cfg)
        state = {k: v for k, v in self.state_dict().items() if k != "embeddings.position_embedding.weight"}
        new.load_state_dict(state, strict=False)
        old_grid, width = self.cfg.grid_size, self.cfg.hidden_size
        table = self.embeddings.position_embedding.weight.detach().reshape(1, old_grid, old_grid, width)
        table = F.interpolate(table.permute(0, 3, 1, 2), size=(cfg.grid_size, cfg.grid_size), mode="bicubic",
                              align_corners=False)
        with torch.no_grad():
            new.embeddings.position_embedding.weight.copy_(table.permute(0, 2, 3, 1).reshape(-1, width))
        return new

    @classmethod
    def from_siglip(cls, path, dtype: torch.dtype = torch.float32) -> "VisionEncoder":
        """Build from a SigLIP (or Idefics3 / SmolVLM) checkpoint in transformers naming, through our name map."""
        folder = weight_files.resolve(path)
        cfg = vision_config_from_hf(weight_files.read_config(folder))
        preprocessor = folder / "preprocessor_config.json"
        if preprocessor.exists():  # normalisation constants travel with the checkpoint
            pre = json.loads(preprocessor.read_text())
            cfg.image_mean = tuple(pre.get("image_mean", cfg.image_mean))
            cfg.image_std = tuple(pre.get("image_std", cfg.image_std))
        model = cls(cfg)
        tensors = weight_files.read_tensors(folder, siglip_name_map(cfg.num_layers), SIGLIP_PREFIXES, dtype)
        weight_files.load_mapped(model, tensors)
        return model.to(dtype).eval()


def _init_weights(module: nn.Module) -> None:
    # A ViT trained from scratch (profiles tiny and smol) starts from small normal weights, as timm does.
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


# ----------------------------------------------------------------------------------------------
# Weight mapping: transformers SigLIP names -> ours. Ours mirror transformers' inside each layer on
# purpose, so the map is short and readable; what differs is the prefix of the containing model.

SIGLIP_PREFIXES = ("model.vision_model.", "vision_model.", "")  # Idefics3/SmolVLM, SiglipModel, SiglipVisionModel


def siglip_name_map(num_layers: int) -> dict[str, str]:
    """Our parameter name -> transformers SiglipVisionModel name (without the containing model's prefix)."""
    names = {
        "embeddings.patch_embedding.weight": "embeddings.patch_embedding.weight",
        "embeddings.patch_embedding.bias": "embeddings.patch_embedding.bias",
        "embeddings.position_embedding.weight": "embeddings.position_embedding.weight",
        "post_layernorm.weight": "post_layernorm.weight",
        "post_layernorm.bias": "post_layernorm.bias",
    }
    per_layer = [
        "layer_norm1.weight", "layer_norm1.bias", "layer_norm2.weight", "layer_norm2.bias",
        "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
        "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    ]
    for i in range(num_layers):
        for name in per_layer:
            names[f"layers.{i}.{name}"] = f"encoder.layers.{i}.{name}"
    return names


def vision_config_from_hf(hf: dict) -> VisionConfig:
    """Our VisionConfig from a SigLIP / SiglipVision / Idefics3 config.json."""
    if "vision_config" in hf:  # SiglipModel, Idefics3, SmolVLM nest the vision tower's config
        hf = hf["vision_config"]
    act = hf.get("hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"unsupported vision activation {act!r}: the course ViT uses tanh-GELU as SigLIP does")
    return VisionConfig(
        image_size=hf.get("image_size", 224), patch_size=hf.get("patch_size", 16),
        num_channels=hf.get("num_channels", 3), hidden_size=hf.get("hidden_size", 768),
        intermediate_size=hf.get("intermediate_size", 3072), num_layers=hf.get("num_hidden_layers", 12),
        num_heads=hf.get("num_attention_heads", 12), layer_norm_eps=hf.get("layer_norm_eps", 1e-6),
    )
