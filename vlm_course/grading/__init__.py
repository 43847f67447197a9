"""Grading for the course's exercises: notebook check cells, pytest extraction, lesson generation.

In a notebook, after an exercise:

    from vlm_course.grading import check
    check("patchify", patchify)       # ✅ patchify: 5 checks passed
                                      # ❌ patchify: patches come out in column-major order - ...

In CI, `exercises_tests/` extracts the definitions from a notebook (`extract_definitions`) and grades them
with the same exercises (`grade`). `python -m vlm_course.grading.sync` writes lessons/ from solutions/.
See README.md in this folder for how to add an exercise.
"""

from __future__ import annotations

import inspect

from .core import Case, Exercise, GradingError, Mutant, Report, grade
from .extract import extract_definitions
from .registry import all_exercises, get_exercise, register

__all__ = ["Case", "Exercise", "GradingError", "Mutant", "Report", "all_exercises", "check", "extract_definitions",
           "get_exercise", "grade", "register"]

_MISSING = object()


def check(name: str, obj=_MISSING) -> None:
    """Grade one exercise and print one line: a pass line, 'not implemented yet', or a hint. Never raises.

    `obj` defaults to the variable called `name` in the caller's namespace (the notebook's globals).
    """
    try:
        exercise = get_exercise(name)
    except KeyError as err:
        print(f"❌ {err.args[0]}")
        return
    if obj is _MISSING:
        frame = inspect.currentframe()
        caller = frame.f_back.f_globals if frame and frame.f_back else {}
        obj = caller.get(name)
    try:
        report = grade(exercise, obj)
    except Exception as err:  # noqa: BLE001 - a grader bug must not look like the learner's traceback
        print(f"❌ {name}: the grader itself failed ({type(err).__name__}: {err}); please report this")
        return
    print(report.line())
