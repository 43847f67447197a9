"""The modality projector: from vision patches to decoder tokens.

A ViT turns a 224 px image into 14 x 14 = 196 patch vectors. Feeding all of them to the decoder is
expensive (attention is quadratic in sequence length), so nanoVLM, SmolVLM and Idefics3 first apply a
*pixel shuffle* (also called space-to-depth): every r x r block of neighbouring patches is folded into one
vector r*r times wider. With r = 2: 196 tokens of 768 -> 49 tokens of 3072. A linear layer then maps the
width to the decoder's hidden size (576 for SmolLM2-135M).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import ProjectorConfig
from .counting import CountTokens


def pixel_shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """Fold each r x r block of a square patch grid into one token: (B, N, D) -> (B, N / r^2, D * r^2).

    The layout is exactly Idefics3's (`Idefics3Connector.pixel_shuffle`), so SmolVLM checkpoints load into
    our projector: within a block the r*r patch vectors are concatenated row by row (a 4x4 grid with r=2 gives
    token 0 = patches [0, 1, 4, 5]), and the blocks themselves come out row-major.
    """
    if x.dim() != 3:
        raise ValueError(f"pixel_shuffle expects (batch, tokens, dim), got shape {tuple(x.shape)}")
    batch, num_tokens, dim = x.shape
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"pixel_shuffle needs a square grid of patches, but {num_tokens} is not a square number")
    if side % r:
        raise ValueError(f"the patch grid is {side}x{side}, which is not divisible by the shuffle factor r={r}")
    x = x.reshape(batch, side, side // r, dim * r)  # fold r neighbours along a row
    x = x.permute(0, 2, 1, 3)  # swap rows and columns so the next fold runs down a column
    x = x.reshape(batch, side // r, side // r, dim * r * r)  # fold r neighbours along a column
    x = x.permute(0, 2, 1, 3)  # back to row-major block order
    return x.reshape(batch, num_tokens // (r * r), dim * r * r)


class ModalityProjector(nn.Module):
    """Pixel shuffle, then a linear layer (or a small MLP) to the decoder width."""

    def __init__(self, cfg: ProjectorConfig, vision_hidden_size: int, decoder_hidden_size: int):
        super().__init__()
        if cfg.kind not in ("linear", "mlp"):
            raise ValueError(f"ModalityProjector is the linear (or mlp) projector, not {cfg.kind!r}: build other kinds "
                             "with vlm_course.registry.build_connector(cfg, vision_hidden_size, decoder_hidden_size)")
        self.cfg = cfg
        in_features = vision_hidden_size * cfg.shuffle_factor**2
        out_features = decoder_hidden_size * cfg.tokens_per_block  # k tokens per block: k widths side by side
        if cfg.kind == "linear":
            self.proj = nn.Linear(in_features, out_features, bias=cfg.bias)
        else:
            hidden = cfg.mlp_hidden_size or decoder_hidden_size
            self.proj = nn.Sequential(
                nn.Linear(in_features, hidden, bias=True),
                nn.GELU(),
                nn.Linear(hidden, out_features, bias=True),
            )
        # Count tokens (the demo): tallies of the blocks' words, appended after the blocks (`vlm_course.counting`).
        self.counter = (CountTokens(cfg.count_labels, in_features, decoder_hidden_size, cfg.counter_hidden_size)
                        if cfg.count_labels else None)
        self.reset_parameters()

    def reset_parameters(self):
        # nanoVLM initialises the projector with a small normal: its outputs start near the scale of token
        # embeddings instead of dwarfing them.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def blocks(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, patches, vision width) -> (B, blocks, r * r * vision width): what the projector and the counter read."""
        return pixel_shuffle(patches, self.cfg.shuffle_factor)

    def block_tokens(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, patches, vision width) -> (B, blocks * k, D): each block's k tokens, row by row."""
        return self.tokens_of(self.blocks(patches))

    def tokens_of(self, blocks: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(blocks)  # (B, blocks, k * D)
        batch, num_blocks, width = tokens.shape
        k = self.cfg.tokens_per_block
        return tokens.reshape(batch, num_blocks * k, width // k)  # a block's k tokens side by side in the sequence

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        blocks = self.blocks(patches)
        tokens = self.tokens_of(blocks)
        if self.counter is None:
            return tokens
        return torch.cat([tokens, self.counter(blocks)], dim=1)

