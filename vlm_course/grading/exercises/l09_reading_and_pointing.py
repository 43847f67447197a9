"""Lesson 09, reading and pointing: normalize_box, image_token_count.

References: vlm_course.evaluation.boxes.normalize_box (Vary-toy's and Qwen-VL's 0-1000 box text) and
VLMConfig.image_tokens_per_image with a second, high-resolution branch (vlm_course.dual_vision). Mutants are the
mistakes learners make; tests/test_grading.py proves each fails with its own hint.
"""

from __future__ import annotations

import dataclasses

from ...config import HighResConfig, ProjectorConfig, VisionConfig, VLMConfig
from ...evaluation.boxes import check_box, normalize_box
from ..core import Case, Exercise, Mutant
from ..registry import register

LESSON = "09"

# ----------------------------------------------------------------------------------------------
# normalize_box(box, width, height) -> (x1, y1, x2, y2) ints in 0-1000


def box_by_width_only(box, width, height):
    x1, y1, x2, y2 = check_box(box, width, height)
    return tuple(round(v * 1000 / width) for v in (x1, y1, x2, y2))


def box_truncated(box, width, height):
    x1, y1, x2, y2 = check_box(box, width, height)
    return (int(x1 * 1000 / width), int(y1 * 1000 / height), int(x2 * 1000 / width), int(y2 * 1000 / height))


def box_floats(box, width, height):
    x1, y1, x2, y2 = check_box(box, width, height)
    return (x1 * 1000 / width, y1 * 1000 / height, x2 * 1000 / width, y2 * 1000 / height)


def box_scale_100(box, width, height):
    x1, y1, x2, y2 = check_box(box, width, height)
    return (round(x1 * 100 / width), round(y1 * 100 / height), round(x2 * 100 / width), round(y2 * 100 / height))


def box_unchecked(box, width, height):
    x1, y1, x2, y2 = box
    return (round(x1 * 1000 / width), round(y1 * 1000 / height), round(x2 * 1000 / width), round(y2 * 1000 / height))


def box_swapped_repaired(box, width, height):
    x1, y1, x2, y2 = box
    return normalize_box((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)), width, height)


register(Exercise(
    name="normalize_box", lesson=LESSON, reference=normalize_box,
    description="a pixel box -> integer coordinates in 0-1000, refusing broken boxes",
    cases=[
        Case("a 64 px square image", lambda: ((16, 8, 48, 40), 64, 64)),
        Case("a non-square 200 x 40 image: x by the width, y by the height", lambda: ((50, 10, 100, 20), 200, 40)),
        Case("coordinates that do not divide evenly: round to the nearest", lambda: ((1, 2, 33, 61), 64, 64)),
        Case("the whole 640 x 480 image", lambda: ((0, 0, 640, 480), 640, 480)),
        Case("x2 < x1 (corners swapped)", lambda: ((40, 0, 10, 10), 64, 64), raises=ValueError),
        Case("y2 < y1", lambda: ((0, 40, 10, 10), 64, 64), raises=ValueError),
        Case("x2 past the right edge of the image", lambda: ((0, 0, 70, 10), 64, 64), raises=ValueError),
        Case("a negative coordinate", lambda: ((-2, 0, 10, 10), 64, 64), raises=ValueError),
    ],
    mutants=[
        Mutant("by_width_only", box_by_width_only,
               "y was divided by the width too - a non-square image scales x by its width and y by its height"),
        Mutant("truncated", box_truncated,
               "the coordinates were cut down with int() - round to the nearest, as the grounding data does"),
        Mutant("floats", box_floats, "the coordinates are floats - the model writes integers: round them"),
        Mutant("scale_100", box_scale_100, "the box is on a 0-100 scale - Vary-toy and Qwen-VL write 0-1000"),
        Mutant("unchecked", box_unchecked,
               "a broken box (swapped corners, or outside the image) went through - a given box must be refused "
               "with a ValueError that says what is wrong"),
        Mutant("swapped_repaired", box_swapped_repaired,
               "swapped corners were silently repaired - that is what a lenient parser may do with a model's text; "
               "a box given as data with x2 < x1 is an error to report"),
    ],
))

# ----------------------------------------------------------------------------------------------
# image_token_count(config) -> <image> tokens per image, both branches


def image_token_count(config: VLMConfig) -> int:
    """Reference: the processor's count, VLMConfig.image_tokens_per_image."""
    return config.image_tokens_per_image


def tokens_first_branch_only(config):
    return config.block_grid_size ** 2 * config.projector.tokens_per_block


def tokens_first_shuffle_for_both(config):
    count = tokens_first_branch_only(config)
    if config.high_res is not None:
        count += (config.high_res.vision.grid_size // config.projector.shuffle_factor) ** 2
    return count


def tokens_first_patch_for_both(config):
    count = tokens_first_branch_only(config)
    if config.high_res is not None:
        count += (config.high_res.vision.image_size // config.vision.patch_size // config.high_res.shuffle_factor) ** 2
    return count


def tokens_no_tokens_per_block(config):
    count = config.block_grid_size ** 2
    if config.high_res is not None:
        count += config.high_res.tokens_per_image
    return count


def tokens_patches_not_squared(config):
    count = config.block_grid_size * config.projector.tokens_per_block
    if config.high_res is not None:
        count += config.high_res.vision.grid_size // config.high_res.shuffle_factor
    return count


def _vision(size: int, patch: int) -> VisionConfig:
    return VisionConfig(image_size=size, patch_size=patch, hidden_size=16, intermediate_size=32, num_layers=1,
                        num_heads=2)


def _config(low=(64, 8, 2), high=None, tokens_per_block=1) -> VLMConfig:
    size, patch, r = low
    config = VLMConfig(vision=_vision(size, patch), projector=ProjectorConfig(shuffle_factor=r,
                                                                               tokens_per_block=tokens_per_block))
    if high is not None:
        size, patch, r = high
        config = dataclasses.replace(config, high_res=HighResConfig(vision=_vision(size, patch), shuffle_factor=r))
    return config


register(Exercise(
    name="image_token_count", lesson=LESSON, reference=image_token_count,
    description="<image> tokens the processor writes per image, with a second vision branch",
    cases=[
        Case("one branch: 64 px, patch 8, r = 2", lambda: (_config(),)),
        Case("the lesson's two branches: 64 px / 8 / r 2 and 128 px / 8 / r 4", lambda: (_config(high=(128, 8, 4)),)),
        Case("a second branch with its own patch size: 192 px / 16 / r 2", lambda: (_config(high=(192, 16, 2)),)),
        Case("two tokens per block in the first branch, 256 px / 16 / r 1 second",
             lambda: (_config(high=(256, 16, 1), tokens_per_block=2),)),
        Case("nanoVLM's 224 / 16 / r 2 with a 448 / 16 / r 4 branch", lambda: (_config((224, 16, 2), (448, 16, 4)),)),
    ],
    mutants=[
        Mutant("first_branch_only", tokens_first_branch_only,
               "only the first branch's tokens were counted - the second branch adds its own run (config.high_res)"),
        Mutant("first_shuffle_for_both", tokens_first_shuffle_for_both,
               "the second branch was folded with the first branch's shuffle factor - it has its own, "
               "config.high_res.shuffle_factor"),
        Mutant("first_patch_for_both", tokens_first_patch_for_both,
               "the second branch's grid used the first branch's patch size - it has its own patch size"),
        Mutant("no_tokens_per_block", tokens_no_tokens_per_block,
               "a block of the first branch can be several tokens: multiply by projector.tokens_per_block"),
        Mutant("not_squared", tokens_patches_not_squared,
               "the grid's side was counted, not its area - a side x side grid has side ** 2 blocks"),
    ],
))
