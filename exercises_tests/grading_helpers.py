"""Shared by the graded test files: one pytest parameter per registered exercise, the assertion that turns a
grading report into a failure message a learner can act on, and `explained`, which gives an end-to-end test's
failure the hint of the piece that causes it."""

from __future__ import annotations

import functools

import pytest

from vlm_course.grading import all_exercises, get_exercise, grade
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


def explain(namespace: dict, names: tuple[str, ...], failure: str) -> str:
    """An end-to-end failure, explained: the check line of each of the learner's pieces that fails its own
    check (with its hint), then what the end-to-end test saw."""
    lines = []
    for name in names:
        if name in namespace:
            report = grade(get_exercise(name), namespace[name])
            if not report.passed:
                lines.append(report.line())
    if not lines:
        lines.append(f"your {', '.join(names)} each pass their own check, but together they do not: "
                     "look at how they are called here (shapes, dtypes, argument order)")
    return "\n".join([*lines, f"(end to end: {failure.strip().splitlines()[0] if failure.strip() else 'failed'})"])


def explained(*names: str):
    """Decorate an end-to-end test (whose first argument is the `notebook` fixture): when it fails, the
    message starts with the hints of the pieces `names` that fail their own checks."""
    def wrap(test):
        @functools.wraps(test)
        def run(notebook, *args, **kwargs):
            try:
                return test(notebook, *args, **kwargs)
            except AssertionError as err:
                raise AssertionError(explain(notebook, names, str(err))) from None
        return run
    return wrap
