"""Lesson 08, the design space: MLPConnector, ResamplerAttention, perceiver_flops, GatedCrossAttentionBlock,
image_prompt_string.

The checks, their seeded inputs and the known mistakes they recognise live in
vlm_course/grading/exercises/l08_design_space.py (the same checks the notebook's check cells run).
"""

import pytest
import torch
from grading_helpers import assert_exercise_passes, explained, learner_object, lesson_exercises, run_learner

from vlm_course import registry
from vlm_course.config import FusionConfig, ProjectorConfig, get_profile
from vlm_course.grading.inputs import randn, randomised
from vlm_course.vlm import VisionLanguageModel

NOTEBOOK = "08_design_space.ipynb"


@pytest.mark.parametrize("exercise", lesson_exercises("08"))
def test_design_space(notebook, exercise):
    assert_exercise_passes(notebook, exercise)


def _tiny(**changes):
    config = get_profile("tiny").config
    for name, value in changes.items():
        setattr(config, name, value)
    config.image_token_id = 49151  # a token of the table, standing in for the tokenizer's <image>
    return config


@explained("MLPConnector")
def test_your_connector_registered_as_a_kind_runs_the_whole_model(notebook):
    """Your MLPConnector, registered under a new kind, inside the whole model with the library's mlp weights: the
    same logits as the library's model."""
    MLPConnector = learner_object(notebook, "MLPConnector")
    registry.register_connector("graded_mlp")(MLPConnector)
    try:
        torch.manual_seed(0)
        reference = VisionLanguageModel(_tiny(projector=ProjectorConfig(kind="mlp", shuffle_factor=2))).eval()
        yours = run_learner("VisionLanguageModel with projector kind 'graded_mlp'", VisionLanguageModel,
                            _tiny(projector=ProjectorConfig(kind="graded_mlp", shuffle_factor=2))).eval()
        run_learner("loading the library's weights into the model with your connector", yours.load_state_dict,
                    reference.state_dict())
        ids = torch.tensor([[5] + [49151] * 16 + [6, 7]])
        pixels = randn(1, 3, 64, 64, seed=7)
        with torch.no_grad():
            expected = reference(ids, pixels).logits
            logits = run_learner("the model's forward with your connector", yours, ids, pixels).logits
    finally:
        registry.unregister("connector", "graded_mlp")
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"the model with your connector gives other logits: {m}")


@explained("GatedCrossAttentionBlock")
def test_your_gated_blocks_in_the_decoder(notebook):
    """Your block in place of the library's inside a cross-attention model: freshly built, the model's logits are the
    language model's exactly; with the library's trained-looking weights, the library model's logits."""
    Block = learner_object(notebook, "GatedCrossAttentionBlock")
    config = _tiny(fusion=FusionConfig(kind="cross_attention"))
    torch.manual_seed(0)
    model = VisionLanguageModel(config).eval()
    ids = torch.tensor([[5, 6, 49151, 7, 8, 9]])
    pixels = randn(1, 3, 64, 64, seed=8)
    d, heads = config.decoder.hidden_size, config.decoder.num_heads
    for key in list(model.fusion.blocks):
        model.fusion.blocks[key] = run_learner(f"GatedCrossAttentionBlock({d}, {heads}, 4, eps)", Block, d, heads, 4,
                                               config.decoder.rms_norm_eps)
    with torch.no_grad():
        embeds, _ = model.prepare(ids, pixels)
        language_model = model.decoder(inputs_embeds=embeds).logits
        fresh = run_learner("the model's forward with your blocks", model, ids, pixels).logits
    assert torch.equal(fresh, language_model), ("with freshly built blocks (gates at 0) the model must be exactly the "
                                                "language model: check the gates' initial value and the tanh")
    torch.manual_seed(1)
    reference = VisionLanguageModel(config).eval()
    randomised(reference.fusion, seed=3)  # open gates, trained-looking weights
    run_learner("loading the library's fusion weights into your blocks", model.load_state_dict, reference.state_dict())
    with torch.no_grad():
        expected = reference(ids, pixels).logits
        logits = model(ids, pixels).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"with open gates your blocks give other logits than the library's: {m}")
