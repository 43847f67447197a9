"""Lesson 02, the projector: pixel_shuffle, image_tokens, Projector.

The checks, their seeded inputs and the known mistakes they recognise live in
vlm_course/grading/exercises/l02_projector.py (the same checks the notebook's check cells run).
"""

import pytest
import torch
from grading_helpers import assert_exercise_passes, explained, learner_object, lesson_exercises, run_learner

from vlm_course.config import ProjectorConfig, VisionConfig
from vlm_course.grading.inputs import randn, randomised
from vlm_course.projector import ModalityProjector
from vlm_course.vision import VisionEncoder

NOTEBOOK = "02_projector.ipynb"


@pytest.mark.parametrize("exercise", lesson_exercises("02"))
def test_projector(notebook, exercise):
    assert_exercise_passes(notebook, exercise)


@explained("pixel_shuffle", "image_tokens", "Projector")
def test_projector_end_to_end(notebook):
    """Image -> ViT -> your Projector gives exactly the reference's image tokens, and as many as your
    image_tokens() predicts."""
    Projector, image_tokens = learner_object(notebook, "Projector"), learner_object(notebook, "image_tokens")
    vision = VisionConfig(image_size=36, patch_size=6, hidden_size=12, intermediate_size=24, num_layers=1, num_heads=3)
    cfg = ProjectorConfig(shuffle_factor=3)
    encoder = randomised(VisionEncoder(vision), seed=9)
    reference = randomised(ModalityProjector(cfg, vision.hidden_size, 10), seed=10)
    with torch.no_grad():
        patches = encoder(randn(2, 3, 36, 36, seed=11))
        expected = reference(patches)
        projector = run_learner("Projector(cfg, 12, 10)", Projector, cfg, vision.hidden_size, 10)
        run_learner("loading ModalityProjector weights into Projector", projector.load_state_dict, reference.state_dict())
        tokens = run_learner("Projector.forward", projector, patches)
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"your projector's image tokens differ from ModalityProjector's: {m}")
    predicted = run_learner("image_tokens(36, 6, 3)", image_tokens, 36, 6, 3)
    assert predicted == tokens.shape[1] == 4, f"image_tokens(36, 6, 3) = {predicted}, the projector made {tokens.shape[1]}"
