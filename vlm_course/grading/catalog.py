"""All exercises of the course, by name.

The first lookup imports every module of `vlm_course.grading.exercises`, and each registers its exercises
(registry.py), so adding a lesson needs no edit here.
"""

from __future__ import annotations

import importlib
import pkgutil

from . import exercises
from .core import Exercise
from .registry import _REGISTRY

_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
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
