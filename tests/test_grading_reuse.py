"""Lessons that build on an earlier lesson's function: lesson 05's collate_batch labels its batch with the
learner's make_labels from lesson 04, so a mistake there is reported with make_labels' own hint."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from vlm_course.grading import extract_definitions, get_exercise, grade

REPO = Path(__file__).resolve().parent.parent

FIRST_ROW_ONLY = """
def make_labels(input_ids, header_ids, end_id):
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    ids, h, t = input_ids[0].tolist(), len(header_ids), 0
    while t + h <= len(ids):
        if ids[t:t + h] != header_ids:
            t += 1
            continue
        start = end = t + h
        while end < len(ids) and ids[end] != end_id:
            end += 1
        labels[0, start:end + 1] = input_ids[0, start:end + 1]
        t = end
    return labels
"""

WITHOUT_IM_END = """
def make_labels(input_ids, header_ids, end_id):
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    h = len(header_ids)
    for row, ids in enumerate(input_ids.tolist()):
        t = 0
        while t + h <= len(ids):
            if ids[t:t + h] != header_ids:
                t += 1
                continue
            start = end = t + h
            while end < len(ids) and ids[end] != end_id:
                end += 1
            labels[row, start:end] = input_ids[row, start:end]
            t = end
    return labels
"""


@pytest.fixture()
def lesson05():
    """Lesson 05's definitions as the graded tests see them (a fresh namespace per test)."""
    return extract_definitions(REPO / "solutions" / "05_training_qlora.ipynb")


def with_make_labels(namespace: dict, source: str) -> dict:
    exec(textwrap.dedent(source), namespace)  # noqa: S102 - the learner's cell, pasted over lesson 04's
    return namespace


def test_collate_batch_calls_make_labels(lesson05):
    assert "make_labels" in lesson05["collate_batch"].__code__.co_names  # a global it calls
    assert grade(get_exercise("collate_batch"), lesson05["collate_batch"]).passed
    assert grade(get_exercise("make_labels"), lesson05["make_labels"]).passed


def test_a_make_labels_mistake_no_collate_mutant_explains_names_make_labels(lesson05):
    namespace = with_make_labels(lesson05, FIRST_ROW_ONLY)
    report = grade(get_exercise("collate_batch"), namespace["collate_batch"])
    assert report.status == "failed"
    assert "your make_labels does not pass its own check yet" in report.message


def test_a_make_labels_mistake_gets_the_same_hint_through_collate_batch(lesson05):
    namespace = with_make_labels(lesson05, WITHOUT_IM_END)
    assert not grade(get_exercise("make_labels"), namespace["make_labels"]).passed
    report = grade(get_exercise("collate_batch"), namespace["collate_batch"])
    assert report.status == "failed" and "the <|im_end|> after each answer is -100" in report.message
