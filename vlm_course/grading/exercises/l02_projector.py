"""Lesson 02, the projector: pixel_shuffle, image_tokens, Projector.

References: vlm_course.projector.pixel_shuffle (Idefics3's layout), the token formula of VLMConfig, and
ModalityProjector. Mutants are the mistakes learners actually make; tests/test_grading.py proves each fails.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ...config import ProjectorConfig
from ...projector import ModalityProjector, pixel_shuffle
from ..core import Case, Exercise, Mutant
from ..inputs import load_weights, randn, randomised
from ..registry import register

LESSON = "02"

# ----------------------------------------------------------------------------------------------
# pixel_shuffle(x, r): (B, N, D) -> (B, N / r^2, D * r^2), exactly as Idefics3Connector.pixel_shuffle


def _sizes(x, r):
    b, n, d = x.shape
    return b, n, d, math.isqrt(n)


def shuffle_column_major_in_block(x, r):
    """Each r x r block read column by column. Idefics3 reads it row by row (as a line of text)."""
    b, n, d, g = _sizes(x, r)
    x = x.reshape(b, g // r, r, g // r, r, d).permute(0, 1, 3, 4, 2, 5)
    return x.reshape(b, n // r**2, d * r * r)


def shuffle_torch_unshuffle(x, r):
    """torch's nn.PixelUnshuffle on a (B, D, g, g) feature map: each token's features come out (D, r, r),
    channel by channel, instead of whole patch vectors one after another."""
    b, n, d, g = _sizes(x, r)
    x = torch.nn.functional.pixel_unshuffle(x.transpose(1, 2).reshape(b, d, g, g), r)
    return x.flatten(2).transpose(1, 2)


def shuffle_blocks_column_major(x, r):
    """Idefics3's steps without the last permute: the blocks come out column by column."""
    b, n, d, g = _sizes(x, r)
    x = x.reshape(b, g, g // r, d * r).permute(0, 2, 1, 3).reshape(b, g // r, g // r, d * r * r)
    return x.reshape(b, n // r**2, d * r * r)


def shuffle_plain_reshape(x, r):
    b, n, d, _ = _sizes(x, r)
    return x.reshape(b, n // r**2, d * r * r)


def shuffle_grid_transposed(x, r):
    """The grid read as (column, row): blocks and the patches inside them both come out transposed."""
    b, n, d, g = _sizes(x, r)
    x = x.reshape(b, g // r, r, g // r, r, d).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, n // r**2, d * r * r)


def shuffle_split_r_first(x, r):
    """Each side split as (r, side / r): the 'block' gathers patches side / r apart, not neighbours."""
    b, n, d, g = _sizes(x, r)
    x = x.reshape(b, r, g // r, r, g // r, d).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, n // r**2, d * r * r)


register(Exercise(
    name="pixel_shuffle", lesson=LESSON, reference=pixel_shuffle,
    description="fold r x r blocks of patches into one token, in Idefics3's layout",
    cases=[
        Case("batch 2, 4x4 grid of width-6 patches, r=2", lambda: (randn(2, 16, 6, seed=51), 2)),
        Case("batch 3, 6x6 grid, width 4, r=2 (3x3 blocks)", lambda: (randn(3, 36, 4, seed=52), 2)),
        Case("batch 1, 6x6 grid, width 5, r=3", lambda: (randn(1, 36, 5, seed=53), 3)),
        Case("float64, batch 2, 8x8 grid, width 3, r=4", lambda: (randn(2, 64, 3, seed=54, dtype=torch.float64), 4)),
        Case("6x6 grid with r=4: 6 is not divisible by 4", lambda: (randn(1, 36, 4, seed=55), 4), raises=ValueError),
        Case("15 patches: not a square grid", lambda: (randn(1, 15, 4, seed=56), 1), raises=ValueError),
    ],
    mutants=[
        Mutant("column_major_in_block", shuffle_column_major_in_block,
               "each r x r block is read column by column - Idefics3 (and so every SmolVLM checkpoint) reads it "
               "row by row: patch (0,0), (0,1), ..., then (1,0), (1,1), ..."),
        Mutant("torch_unshuffle", shuffle_torch_unshuffle,
               "the features are interleaved channel by channel, as F.pixel_unshuffle lays them out (D, r, r) - "
               "Idefics3 puts whole patch vectors one after another: (r, r, D)"),
        Mutant("blocks_column_major", shuffle_blocks_column_major,
               "the tokens come out in column-major block order - permute back (0, 2, 1, 3) before the last reshape"),
        Mutant("plain_reshape", shuffle_plain_reshape,
               "a plain reshape groups r*r consecutive patches of one row, not an r x r square of neighbours"),
        Mutant("grid_transposed", shuffle_grid_transposed,
               "the grid is read transposed (columns as rows), across blocks and inside them - the patch index is "
               "row * side + column, so view as (B, block row, row in block, block column, column in block, D)"),
        Mutant("split_r_first", shuffle_split_r_first,
               "each side was split as (r, side/r), so a token gathers patches side/r apart instead of an r x r "
               "square of neighbours - split as (side/r, r): (which block, where in the block)"),
    ],
))

# ----------------------------------------------------------------------------------------------
# image_tokens(image_size, patch_size, shuffle_factor) -> int


def image_tokens(image_size: int, patch_size: int, shuffle_factor: int) -> int:
    """Reference: Idefics3's image_seq_len = (image_size // patch_size) ** 2 // r ** 2, with the input checks."""
    if image_size < patch_size:
        raise ValueError(f"a {image_size}px image is smaller than one {patch_size}px patch")
    grid = image_size // patch_size  # a stride-p conv drops the leftover pixels
    if grid % shuffle_factor:
        raise ValueError(f"the {grid}x{grid} patch grid is not divisible by the shuffle factor {shuffle_factor}")
    return (grid // shuffle_factor) ** 2


def tokens_per_side(image_size, patch_size, shuffle_factor):
    return image_size // patch_size // shuffle_factor


def tokens_divided_by_r(image_size, patch_size, shuffle_factor):
    return (image_size // patch_size) ** 2 // shuffle_factor


def tokens_true_division(image_size, patch_size, shuffle_factor):
    return (image_size / patch_size) ** 2 / shuffle_factor**2


def tokens_rounded_up(image_size, patch_size, shuffle_factor):
    return math.ceil(image_size / patch_size) ** 2 // shuffle_factor**2


def tokens_no_shuffle(image_size, patch_size, shuffle_factor):
    return (image_size // patch_size) ** 2


def tokens_side_divided_by_r_squared(image_size, patch_size, shuffle_factor):
    return (image_size // patch_size // shuffle_factor**2) ** 2


register(Exercise(
    name="image_tokens", lesson=LESSON, reference=image_tokens,
    description="decoder tokens per image for a resolution, patch size and shuffle factor",
    cases=[
        Case("nanoVLM: 224 px, patch 16, r=2", lambda: (224, 16, 2)),
        Case("SmolVLM-2B: 384 px, patch 14, r=3 (384/14 is not whole)", lambda: (384, 14, 3)),
        Case("SmolVLM-256M: 512 px, patch 16, r=4", lambda: (512, 16, 4)),
        Case("Idefics3: 364 px, patch 14, r=2", lambda: (364, 14, 2)),
        Case("no shuffle: 224 px, patch 16, r=1", lambda: (224, 16, 1)),
        Case("224 px, patch 16, r=3: the 14x14 grid is not divisible by 3", lambda: (224, 16, 3), raises=ValueError),
        Case("8 px image, patch 16: smaller than one patch", lambda: (8, 16, 1), raises=ValueError),
    ],
    mutants=[
        Mutant("per_side", tokens_per_side,
               "that is the number of tokens along one side of the grid - square it"),
        Mutant("divided_by_r", tokens_divided_by_r,
               "divided by r, not r^2 - pixel shuffle merges an r x r block of patches into one token"),
        Mutant("true_division", tokens_true_division,
               "use whole-number (floor) division and return an int: a stride-p conv drops leftover pixels "
               "(384 // 14 = 27 patches per side)"),
        Mutant("rounded_up", tokens_rounded_up,
               "the patch grid was rounded up - a stride-p conv drops the leftover pixels (384 // 14 = 27)"),
        Mutant("no_shuffle", tokens_no_shuffle,
               "that is the number of patches - pixel shuffle then merges each r x r block into one token"),
        Mutant("side_divided_by_r_squared", tokens_side_divided_by_r_squared,
               "each side of the grid was divided by r^2 - per side the shuffle divides by r, so the count is "
               "divided by r^2 once: (side // r) ** 2"),
    ],
))

# ----------------------------------------------------------------------------------------------
# Projector(cfg, vision_hidden_size, decoder_hidden_size): pixel shuffle, then a bias-free linear


class _UnshuffleProjector(ModalityProjector):
    def forward(self, patches):
        return self.proj(shuffle_torch_unshuffle(patches, self.cfg.shuffle_factor))


class _BiasProjector(ModalityProjector):
    def __init__(self, cfg, vision_hidden_size, decoder_hidden_size):
        super().__init__(cfg, vision_hidden_size, decoder_hidden_size)
        self.proj = nn.Linear(vision_hidden_size * cfg.shuffle_factor**2, decoder_hidden_size, bias=True)


class _GeluProjector(ModalityProjector):
    def forward(self, patches):
        return torch.nn.functional.gelu(super().forward(patches))


class _PlainReshapeProjector(ModalityProjector):
    def forward(self, patches):
        return self.proj(shuffle_plain_reshape(patches, self.cfg.shuffle_factor))


class _WidthTimesR(ModalityProjector):
    def __init__(self, cfg, vision_hidden_size, decoder_hidden_size):
        super().__init__(cfg, vision_hidden_size, decoder_hidden_size)
        self.proj = nn.Linear(vision_hidden_size * cfg.shuffle_factor, decoder_hidden_size, bias=False)


def _projector_case(r, vision, decoder, batch, grid, seed, dtype=torch.float32):
    def inputs():
        cfg = ProjectorConfig(shuffle_factor=r)
        state = randomised(ModalityProjector(cfg, vision, decoder), seed).state_dict()
        return cfg, vision, decoder, state, randn(batch, grid * grid, vision, seed=seed + 100, dtype=dtype)
    return inputs


def run_projector(cls, cfg, vision_hidden_size, decoder_hidden_size, state, patches):
    projector = load_weights(cls(cfg, vision_hidden_size, decoder_hidden_size), state, "Projector", "ModalityProjector")
    return projector.to(patches.dtype).eval()(patches)


register(Exercise(
    name="Projector", lesson=LESSON, reference=ModalityProjector, call=run_projector,
    description="pixel shuffle, then one bias-free linear layer to the decoder width", uses=("pixel_shuffle",),
    cases=[
        Case("r=2, batch 2, 4x4 grid of width 6 -> decoder width 10", _projector_case(2, 6, 10, 2, 4, 61)),
        Case("r=3, batch 1, 6x6 grid of width 5 -> decoder width 7", _projector_case(3, 5, 7, 1, 6, 62)),
        Case("float64, r=2, batch 3, 6x6 grid of width 4 -> decoder width 3",
             _projector_case(2, 4, 3, 3, 6, 63, torch.float64), atol=1e-10, rtol=1e-10),
    ],
    mutants=[
        Mutant("unshuffle_layout", _UnshuffleProjector,
               "the output matches a projector that shuffles with F.pixel_unshuffle's (D, r, r) layout - "
               "use your Idefics3-order pixel_shuffle, which passed its check"),
        Mutant("bias", _BiasProjector,
               "nanoVLM's and Idefics3's projector is one linear layer without bias: nn.Linear(..., bias=False)"),
        Mutant("width_times_r", _WidthTimesR,
               "the linear layer's input width must be vision_hidden_size * r^2 (r x r patches per token)"),
        Mutant("activation", _GeluProjector,
               "an activation after the linear layer - nanoVLM's and Idefics3's projector is the linear layer alone "
               "(the decoder's first layers do the non-linear work)"),
        Mutant("plain_reshape_shuffle", _PlainReshapeProjector,
               "the projector's tokens are r*r consecutive patches of one row (a plain reshape) - shuffle with your "
               "pixel_shuffle, which passed its check"),
    ],
))
