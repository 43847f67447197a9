"""Lesson 06, evaluation: normalize_answer, vqa_accuracy, mmstar_match, levenshtein, anls.

The checks, their inputs and the known mistakes they recognise live in
vlm_course/grading/exercises/l06_evaluation.py (the same checks the notebook's check cells run).
"""

import pytest
from grading_helpers import assert_exercise_passes, explained, learner_object, lesson_exercises, run_learner

from vlm_course import evaluation

NOTEBOOK = "06_evaluation.ipynb"

# (prediction, gold) pairs as a small model writes them, scored end to end below.
VQA_ROWS = [("Two", ["2"] * 4 + ["3"] * 6), ("the red one.", ["red"] * 2 + ["red one"] * 8), ("yes", ["Yes"]),
            ("A dog", ["dog", "dog", "puppy"]), ("x-ray", ["x ray"] * 3 + ["xray"] * 7)]
MC_ROWS = [("B", "B"), ("(c) a cat", "C"), ("The answer is D", "D"), ("Answer: C", "C"), ("d", "A"),
           ("Option A", "A"), ("the answer is (A)", "A"), ("\n  c.", "C")]
ANLS_ROWS = [("Invoice 2024-17", ["invoice 2024-17"]), ("invoice 2024-71", ["Invoice 2024-17"]),
             ("$12.50", ["12.50", "$12.50"]), ("total", ["subtotal"]), ("tot", ["subtotal"])]


@pytest.mark.parametrize("exercise", lesson_exercises("06"))
def test_evaluation(notebook, exercise):
    assert_exercise_passes(notebook, exercise)


@explained("normalize_answer", "vqa_accuracy", "mmstar_match", "levenshtein", "anls")
def test_evaluation_scores_a_small_run_like_the_library(notebook):
    """Your three metrics, averaged over a handful of answers, give the library's dataset-level scores."""
    vqa, mc, anls = (learner_object(notebook, n) for n in ("vqa_accuracy", "mmstar_match", "anls"))
    for name, fn, reference, rows in (("vqa_accuracy", vqa, evaluation.vqa_accuracy, VQA_ROWS),
                                      ("mmstar_match", mc, evaluation.mmstar_match, MC_ROWS),
                                      ("anls", anls, evaluation.anls, ANLS_ROWS)):
        mine = sum(run_learner(f"{name}({p!r}, {g!r})", fn, p, g) for p, g in rows) / len(rows)
        expected = sum(reference(p, g) for p, g in rows) / len(rows)
        assert mine == pytest.approx(expected, abs=1e-9), f"{name} averaged over {len(rows)} answers: {mine} != {expected}"
