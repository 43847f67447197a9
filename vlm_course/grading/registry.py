"""Where each lesson's exercises register themselves, by name.

Each lesson's exercises live in one module of `vlm_course.grading.exercises` (`l01_vit_patching.py`, ...)
that calls `register(Exercise(...))` at import time. Looking exercises up (and importing those modules the
first time) is catalog.py's job: this table imports nothing of the exercises, so they can import it.
"""

from __future__ import annotations

from .core import Exercise

_REGISTRY: dict[str, Exercise] = {}


def register(exercise: Exercise) -> Exercise:
    if exercise.name in _REGISTRY and _REGISTRY[exercise.name] is not exercise:
        raise ValueError(f"two exercises are named {exercise.name!r}: exercise names must be unique course-wide")
    _REGISTRY[exercise.name] = exercise
    return exercise
