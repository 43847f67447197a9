"""Lesson 01, ViT patching: patchify, conv_to_linear, scaled_dot_product_attention, multi_head_attention, ViTBlock.

The checks, their seeded inputs and the known mistakes they recognise live in
vlm_course/grading/exercises/l01_vit_patching.py (the same checks the notebook's check cells run).
"""

import pytest
import torch
from grading_helpers import assert_exercise_passes, explained, learner_object, lesson_exercises, run_learner

from vlm_course.config import VisionConfig
from vlm_course.grading.inputs import randn, randomised
from vlm_course.vision import VisionEncoder

NOTEBOOK = "01_vit_patching.ipynb"


@pytest.mark.parametrize("exercise", lesson_exercises("01"))
def test_vit_patching(notebook, exercise):
    assert_exercise_passes(notebook, exercise)


@explained("patchify", "conv_to_linear", "scaled_dot_product_attention", "multi_head_attention", "ViTBlock")
def test_vit_patching_end_to_end(notebook):
    """Your pieces, assembled, are a whole ViT: patchify -> linear patch embedding -> + positions -> your blocks
    -> final LayerNorm must reproduce vlm_course's VisionEncoder on a non-trivial (random-weight) encoder."""
    patchify, conv_to_linear, ViTBlock = (learner_object(notebook, n) for n in ("patchify", "conv_to_linear", "ViTBlock"))
    cfg = VisionConfig(image_size=24, patch_size=4, hidden_size=36, intermediate_size=72, num_layers=2, num_heads=3)
    encoder = randomised(VisionEncoder(cfg), seed=7)
    pixels = randn(2, 3, 24, 24, seed=8)
    with torch.no_grad():
        expected = encoder(pixels)
        patches = run_learner("patchify", patchify, pixels, cfg.patch_size)
        linear = run_learner("conv_to_linear", conv_to_linear, encoder.embeddings.patch_embedding)
        x = run_learner("the linear patch embedding", linear, patches) + encoder.embeddings.position_embedding.weight
        for i, layer in enumerate(encoder.layers):
            block = run_learner("ViTBlock(cfg)", ViTBlock, cfg)
            run_learner("loading VisionBlock weights into ViTBlock", block.load_state_dict, layer.state_dict())
            x = run_learner(f"ViTBlock layer {i}", block, x)
        x = encoder.post_layernorm(x)
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"your assembled encoder differs from VisionEncoder: {m}")
