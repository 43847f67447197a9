"""Shared by the graded test files: one pytest parameter per registered exercise, and the assertion that
turns a grading report into a failure message a learner can act on."""

from __future__ import annotations

import pytest

from vlm_course.grading import all_exercises, grade
from vlm_course.grading.extract import ERRORS_KEY


def lesson_exercises(lesson: str) -> list:
    """pytest params for every exercise of a lesson ("01"), with the exercise name as the test id."""
    return [pytest.param(exercise, id=exercise.name) for exercise in all_exercises(lesson)]


def learner_object(namespace: dict, name: str):
    """The learner's definition, or a failure that says why it is missing."""
    if name not in namespace:
        problems = "".join(f"\n  - {e}" for e in namespace.get(ERRORS_KEY, []))
        raise AssertionError(f"the notebook defines no `{name}`" + (f"; extraction problems:{problems}" if problems else ""))
    return namespace[name]


def assert_exercise_passes(namespace: dict, exercise) -> None:
    report = grade(exercise, learner_object(namespace, exercise.name))
    assert report.passed, report.line()


def run_learner(what: str, fn, *args):
    """Call learner code in an end-to-end test; any exception becomes a test failure naming the step."""
    try:
        return fn(*args)
    except NotImplementedError as err:
        raise AssertionError(f"{what}: not implemented yet ({err})") from err
    except Exception as err:  # noqa: BLE001
        raise AssertionError(f"{what} raised {type(err).__name__}: {err}") from err
