"""Two vision branches, as Vary-toy (arXiv 2401.12503): the CLIP-like branch plus a high-resolution "vision vocabulary".

A 64 px image in 8 px patches, pixel-shuffled by 2, is 16 tokens: enough to say "a red circle top left", not to read
a word printed a few pixels high. Vary adds a second encoder that reads the picture at a higher resolution (its SAM-
based branch reads 1024 px while CLIP reads 224 px) with its own projector, and concatenates the two token runs:

    pixels (N, 3, 128, 128) --downsample--> (N, 3, 64, 64) -> low ViT  -> projector.low  -> (N, 16, D)  --+
                            ----------------------------------> high ViT -> projector.high -> (N, 16, D)  --+-> cat (N, 32, D)

The processor resizes every image to the high-resolution side (`VLMConfig.pixel_size`) and writes
`VLMConfig.image_tokens_per_image` <image> tokens for it (the first branch's, then the second's); the first branch
sees the same pixels averaged down to its own size, so one pixel tensor feeds both.

    model = add_high_res_branch(VisionLanguageModel.from_profile("smol"), HighResConfig())
    processor = VLMProcessor.from_config(model.config)   # after adding the branch: it counts the new tokens

`VisionLanguageModel` builds these two modules in place of its single ViT and projector when its config has
`high_res` set, so `vision="full"` / `projector="full"` in a TrainConfig train both branches, and save/load work as
for any model (the names gain `low.` / `high.`).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import HighResConfig, ProjectorConfig, VLMConfig
from .projector import ModalityProjector
from .vision import VisionEncoder


class DualFeatures(NamedTuple):
    """Patch features of the two branches: (N, P_low, D_low) and (N, P_high, D_high)."""

    low: torch.Tensor
    high: torch.Tensor


def downsample(pixel_values: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) normalised pixels -> (N, 3, size, size), antialiased: what the low branch sees. Normalisation is
    per-channel affine, so averaging normalised pixels equals normalising averaged ones."""
    if pixel_values.shape[-1] == size and pixel_values.shape[-2] == size:
        return pixel_values
    return F.interpolate(pixel_values, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class DualVisionEncoder(nn.Module):
    """The first ViT on downsampled pixels and the second on the full-resolution ones -> `DualFeatures`."""

    def __init__(self, low: VisionEncoder, high: VisionEncoder):
        super().__init__()
        self.low, self.high = low, high
        self.cfg = low.cfg  # what code written for one branch reads (its normalisation, its size)

    @classmethod
    def from_config(cls, config: VLMConfig) -> "DualVisionEncoder":
        return cls(VisionEncoder(config.vision), VisionEncoder(config.high_res.vision))

    def forward(self, pixel_values: torch.Tensor) -> DualFeatures:
        size = self.high.cfg.image_size
        if pixel_values.dim() == 4 and pixel_values.shape[-2:] != (size, size):
            raise ValueError(f"pixel_values are {pixel_values.shape[-2]}x{pixel_values.shape[-1]} but the "
                             f"high-resolution branch reads {size}x{size}: build them with a processor made from "
                             "this model's config (VLMProcessor.from_config(model.config), after add_high_res_branch)")
        return DualFeatures(self.low(downsample(pixel_values, self.low.cfg.image_size)), self.high(pixel_values))


def high_res_projector_config(projector: ProjectorConfig, high_res: HighResConfig) -> ProjectorConfig:
    """The second branch's projector: the first's kind and bias, its own shuffle factor, one token per block."""
    return dataclasses.replace(projector, shuffle_factor=high_res.shuffle_factor, tokens_per_block=1, count_labels=())


class DualProjector(nn.Module):
    """Each branch's patches through its own projector, then the token runs concatenated: (N, T_low + T_high, D)."""

    def __init__(self, low: ModalityProjector, high: ModalityProjector):
        super().__init__()
        self.low, self.high = low, high
        self.cfg = low.cfg
        self.counter = None  # count tokens (`vlm_course.counting`) are a one-branch feature

    @classmethod
    def from_config(cls, config: VLMConfig) -> "DualProjector":
        width = config.decoder.hidden_size
        return cls(ModalityProjector(config.projector, config.vision.hidden_size, width),
                   ModalityProjector(high_res_projector_config(config.projector, config.high_res),
                                     config.high_res.vision.hidden_size, width))

    def forward(self, features: DualFeatures) -> torch.Tensor:
        if not isinstance(features, DualFeatures):
            raise TypeError(f"DualProjector takes DualFeatures (low, high) from a DualVisionEncoder, got "
                            f"{type(features).__name__}")
        return torch.cat([self.low(features.low), self.high(features.high)], dim=1)


def token_budget(config: VLMConfig) -> dict[str, int]:
    """Decoder tokens per image, branch by branch: patches -> blocks after pixel shuffle -> tokens."""
    low = config.vision.grid_size ** 2
    budget = {"low_patches": low, "low_tokens": config.block_grid_size ** 2 * config.projector.tokens_per_block}
    if config.high_res is not None:
        budget["high_patches"] = config.high_res.vision.grid_size ** 2
        budget["high_tokens"] = config.high_res.tokens_per_image
    budget["total_tokens"] = config.image_tokens_per_image
    return budget


def add_high_res_branch(model, high_res: HighResConfig | None = None, init: str = "copy"):
    """Give a one-branch VisionLanguageModel Vary-toy's second branch, in place; returns the model.

    The first branch (ViT and projector) keeps its weights. The second ViT starts as a copy of the first resized to
    the high-resolution size (`VisionEncoder.resized`: position embeddings resampled, every other weight copied) when
    `init="copy"` and the two ViTs have the same shape apart from the image size; `init="random"` starts it afresh.
    Its projector starts fresh. Build the processor again afterwards: it writes more <image> tokens per image.
    """
    if getattr(getattr(model, "config", None), "high_res", None) is not None:
        raise ValueError("the model already has a high-resolution branch (config.high_res is set)")
    if not isinstance(getattr(model, "vision", None), VisionEncoder):
        raise TypeError(f"add_high_res_branch takes a one-branch VisionLanguageModel, got {type(model).__name__}")
    if init not in ("copy", "random"):
        raise ValueError(f"init must be 'copy' or 'random', got {init!r}")
    high_res = copy.deepcopy(high_res or HighResConfig())
    low_vision = model.vision.cfg
    high_res.vision.image_mean, high_res.vision.image_std = low_vision.image_mean, low_vision.image_std
    dataclasses.replace(model.config, high_res=high_res)  # runs VLMConfig's checks before anything changes
    config = model.config
    device = next(model.parameters()).device
    same_shape = dataclasses.replace(low_vision, image_size=high_res.vision.image_size) == high_res.vision
    if init == "copy" and not same_shape:
        raise ValueError("init='copy' needs a second ViT shaped like the first (same patch size, widths, layers): "
                         f"got {high_res.vision} for a copy of {low_vision}; use init='random'")
    high = model.vision.resized(high_res.vision.image_size) if init == "copy" else VisionEncoder(high_res.vision)
    projector = ModalityProjector(high_res_projector_config(config.projector, high_res), high_res.vision.hidden_size,
                                  config.decoder.hidden_size)
    model.vision = DualVisionEncoder(model.vision, high.to(device))
    model.projector = DualProjector(model.projector, projector.to(device))
    config.high_res = high_res
    return model
