"""Lesson 07, Jetson deployment: weights_bytes, decoder_parameters, kv_cache_bytes, decode_tokens_per_second.

The checks, their inputs and the known mistakes they recognise live in
vlm_course/grading/exercises/l07_deployment.py (the same checks the notebook's check cells run).
"""

import pytest
from grading_helpers import assert_exercise_passes, explained, learner_object, lesson_exercises, run_learner

from vlm_course.config import get_profile
from vlm_course.deploy import ORIN_NANO_8GB, decode_roofline, estimate_memory
from vlm_course.vlm import VisionLanguageModel

NOTEBOOK = "07_jetson_deployment.ipynb"


@pytest.mark.parametrize("exercise", lesson_exercises("07"))
def test_deployment(notebook, exercise):
    assert_exercise_passes(notebook, exercise)


@explained("weights_bytes", "decoder_parameters", "kv_cache_bytes", "decode_tokens_per_second")
def test_budget_of_a_real_module_and_the_orin_nano(notebook):
    """Your counts match a real decoder's tensors, and your budget pieces add up to estimate_memory's and
    decode_roofline's figures for the tiny profile's decoder and for nanoVLM's SmolLM2 on an Orin Nano."""
    weights_bytes, decoder_parameters, kv_cache_bytes, tokens_per_s = (learner_object(notebook, n) for n in (
        "weights_bytes", "decoder_parameters", "kv_cache_bytes", "decode_tokens_per_second"))
    tiny = get_profile("tiny").config
    model = VisionLanguageModel(tiny)
    stored = sum(p.numel() for p in {id(p): p for p in model.decoder.parameters()}.values())  # tied: counted once
    assert run_learner("decoder_parameters(tiny decoder)", decoder_parameters, tiny.decoder) == stored

    nano = get_profile("nano").config
    budget = estimate_memory(nano, weights="fp16", kv_bits="fp16", context_length=2048, device=ORIN_NANO_8GB)
    mine = run_learner("weights_bytes", weights_bytes, run_learner("decoder_parameters", decoder_parameters,
                                                                   nano.decoder), 16)
    assert mine == pytest.approx(budget.weights["decoder"], rel=1e-9)
    assert run_learner("kv_cache_bytes", kv_cache_bytes, nano.decoder, 2048, 1, 2) == pytest.approx(budget.kv_cache,
                                                                                                   rel=1e-9)
    roof = decode_roofline(nano, ORIN_NANO_8GB, weights="fp16", kv_bits="fp16", context_length=2048)
    assert run_learner("decode_tokens_per_second", tokens_per_s, 68, nano.decoder, 16, 2048, 2) == pytest.approx(
        roof.tokens_per_s, rel=1e-9)
