"""Lesson 09, reading and pointing: normalize_box, image_token_count.

The checks, their seeded inputs and the known mistakes they recognise live in
vlm_course/grading/exercises/l09_reading_and_pointing.py (the same checks the notebook's check cells run).
"""

import dataclasses

import pytest
import torch
from grading_helpers import assert_exercise_passes, explained, learner_object, lesson_exercises, run_learner

from vlm_course.config import HighResConfig, get_profile
from vlm_course.data import reading, synthetic
from vlm_course.dual_vision import add_high_res_branch
from vlm_course.processing import VLMProcessor
from vlm_course.vlm import VisionLanguageModel

NOTEBOOK = "09_reading_and_pointing.ipynb"


@pytest.mark.parametrize("exercise", lesson_exercises("09"))
def test_reading_and_pointing(notebook, exercise):
    assert_exercise_passes(notebook, exercise)


@explained("normalize_box")
def test_your_boxes_are_the_grounding_data_boxes(notebook):
    """format of your normalize_box on each target shape == the answer the grounding generator wrote."""
    normalize_box = learner_object(notebook, "normalize_box")
    for size in (64, 128):
        shapes = [synthetic.Shape("square", "blue", cx=10.0 + 7 * k, cy=size - 12.0 - 5 * k, size=16.0) for k in range(5)]
        for shape in shapes:
            box = run_learner(f"normalize_box({shape.box}, {size}, {size})", normalize_box, shape.box, size, size)
            written = "[" + ", ".join(str(v) for v in box) + "]"
            assert written == synthetic.box_text(shape, size), (
                f"normalize_box{shape.box, size, size} gives {written}, the grounding data writes "
                f"{synthetic.box_text(shape, size)}")


@explained("image_token_count")
def test_your_count_is_what_the_two_branches_give(notebook):
    """A tiny model with a second branch: your count == <image> tokens the processor writes == features made."""
    image_token_count = learner_object(notebook, "image_token_count")
    torch.manual_seed(0)
    model = VisionLanguageModel(get_profile("tiny").config).eval()
    vision = dataclasses.replace(model.config.vision, image_size=128, patch_size=16)
    add_high_res_branch(model, HighResConfig(vision=vision, shuffle_factor=2), init="random")
    processor = VLMProcessor.from_config(model.config)
    row = reading.small_print(1, seed=3)[0]
    batch = processor([row["images"][0]], [row["texts"][0]["user"]])
    with torch.no_grad():
        features = model.encode_images(batch["pixel_values"])
    written = int((batch["input_ids"] == processor.image_token_id).sum())
    counted = run_learner("image_token_count(model.config)", image_token_count, model.config)
    assert counted == written == features.shape[1] == 32, (
        f"your count {counted}; the processor wrote {written} <image> tokens; the branches gave {features.shape[1]}")
