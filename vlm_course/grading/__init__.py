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

import importlib
import inspect

# Imported lazily, so that `python -m vlm_course.grading.sync` (no torch needed) starts fast.
_LAZY = {"Case": "core", "Exercise": "core", "GradingError": "core", "Mutant": "core", "Report": "core",
         "grade": "grader", "extract_definitions": "extract", "all_exercises": "catalog", "get_exercise": "catalog",
         "register": "registry"}
__all__ = sorted([*_LAZY, "check"])


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_MISSING = object()


def check(name: str, obj=_MISSING) -> None:
    """Grade one exercise and print one line: a pass line, 'not implemented yet', or a hint. Never raises.

    `obj` defaults to the variable called `name` in the caller's namespace (the notebook's globals).
    """
    from .catalog import get_exercise
    from .grader import grade

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
