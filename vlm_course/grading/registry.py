"""All exercises of the course, by name.

Each lesson's exercises live in one module of `vlm_course.grading.exercises` (`l01_vit_patching.py`, ...)
that calls `register(Exercise(...))` at import time. The registry imports every module of that package the
first time it is asked for an exercise, so adding a lesson needs no edit here.
"""

from __future__ import annotations

import importlib
import pkgutil

from .core import Exercise

_REGISTRY: dict[str, Exercise] = {}
_loaded = False


def register(exercise: Exercise) -> Exercise:
    if exercise.name in _REGISTRY and _REGISTRY[exercise.name] is not exercise:
        raise ValueError(f"two exercises are named {exercise.name!r}: exercise names must be unique course-wide")
    _REGISTRY[exercise.name] = exercise
    return exercise


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    from . import exercises

    for info in sorted(pkgutil.iter_modules(exercises.__path__), key=lambda m: m.name):
        importlib.import_module(f"{exercises.__name__}.{info.name}")
    _loaded = True


def get_exercise(name: str) -> Exercise:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"no exercise named {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def all_exercises(lesson: str | None = None) -> list[Exercise]:
    """Exercises in registration order (the order of the lesson), optionally of one lesson ("01")."""
    _load_all()
    return [ex for ex in _REGISTRY.values() if lesson is None or ex.lesson == lesson]
