"""What an exercise is, and how one run of an implementation is compared with another.

An `Exercise` is a name, a reference with the same interface as the learner's object, a list of seeded
`Case`s and a list of `Mutant`s: plausible wrong implementations, each with the hint to show when the
learner's output is the mutant's output. `run` calls an implementation on a case (an exception becomes an
`Outcome`, never a traceback); `compare` says in one sentence what differs. grader.py grades with these.

The inputs are rebuilt for every call from a fixed seed, so an implementation that modifies its inputs in
place cannot spoil the comparison.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


class GradingError(Exception):
    """Raised by an exercise's `call` adaptor when the learner's object cannot even be run (e.g. its parameter
    names do not match the reference's). The message is shown to the learner as is."""


@dataclass
class Case:
    """One seeded check. `inputs()` returns a fresh tuple of positional arguments for `Exercise.call`."""

    name: str  # what the learner reads when this case fails: "batch 2, non-square 8x20 image, patch 4"
    inputs: Callable[[], tuple]
    raises: type[BaseException] | None = None  # the exercise must raise this (bad input must be refused)
    atol: float | None = None  # None: the exercise's tolerance
    rtol: float | None = None


@dataclass
class Mutant:
    """A plausible wrong implementation, with the hint to show when the learner's output matches it."""

    name: str  # short id, used in test ids: "column_major"
    impl: Any  # same interface as the exercise's reference (a function, or a class for class exercises)
    hint: str  # "patches come out in column-major order - flatten rows first"


def call_function(impl: Callable, *args):
    """The default adaptor: the learner's object is a function of the case's inputs."""
    return impl(*args)


@dataclass
class Exercise:
    name: str  # the name the learner defines in the notebook: "patchify", "ViTBlock"
    lesson: str  # two digits: "01"
    reference: Any  # same interface as the learner's object, built on vlm_course
    cases: list[Case]
    mutants: list[Mutant] = field(default_factory=list)
    call: Callable = call_function  # call(impl, *case.inputs()) -> output; adapts classes, modules, ...
    atol: float = 1e-5
    rtol: float = 1e-5
    description: str = ""  # one line for listings
    uses: tuple[str, ...] = ()  # earlier exercises the learner's code calls: named when no mutant explains a failure


@dataclass
class Report:
    name: str
    status: str  # "passed", "failed", "not_implemented"
    checks: int  # how many cases were run
    message: str = ""  # the hint or the difference, empty when passed
    case: str = ""  # the case that failed

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def line(self) -> str:
        """The line a notebook check cell prints."""
        if self.passed:
            return f"✅ {self.name}: {self.checks} checks passed"
        if self.status == "not_implemented":
            return f"⏳ {self.name}: not implemented yet{self.message}"
        where = f"  [check: {self.case}]" if self.case else ""
        return f"❌ {self.name}: {self.message}{where}"


# ----------------------------------------------------------------------------------------------
# Outcomes and comparison


@dataclass
class Outcome:
    """What happened when an implementation ran on a case: a value, or an exception."""

    value: Any = None
    error: BaseException | None = None


def run(exercise: Exercise, impl, case: Case) -> Outcome:
    try:
        return Outcome(value=exercise.call(impl, *case.inputs()))
    except Exception as err:  # noqa: BLE001 - every learner exception becomes a message, never a traceback
        return Outcome(error=err)


def compare(expected, actual, atol: float, rtol: float, equal_nan: bool = False) -> str | None:
    """None when `actual` matches `expected`; else one sentence saying what differs.

    equal_nan: used only to recognise a mutant (`expected` is then the mutant's output). A NaN in the
    mutant's output marks a value its mistake leaves undefined (softmax over no key at all): any value of
    the learner's matches there, NaN or the zeros F.scaled_dot_product_attention writes. A mutant whose
    output is NaN everywhere defines nothing and matches nothing.
    """
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor):
            return f"expected a torch.Tensor, got {type(actual).__name__}"
        expected, actual = expected.detach(), actual.detach()
        if actual.shape != expected.shape:
            return f"wrong shape: expected {tuple(expected.shape)}, got {tuple(actual.shape)}"
        if actual.dtype != expected.dtype:
            return f"wrong dtype: expected {expected.dtype}, got {actual.dtype} (keep the input's dtype)"
        if equal_nan and expected.is_floating_point():
            undefined = expected.isnan()
            if undefined.all() and expected.numel():
                return "the mutant's output is undefined everywhere"
            expected = torch.where(undefined, actual, expected)
        if not torch.allclose(actual, expected, atol=atol, rtol=rtol, equal_nan=equal_nan):
            diff = (actual - expected).abs()
            worst = float(diff.nan_to_num(float("inf")).max())
            return f"right shape, wrong values: max abs difference {worst:.3g} (tolerance {atol:g} + {rtol:g} x |expected|)"
        return None
    if isinstance(expected, (tuple, list)):
        if not isinstance(actual, (tuple, list)) or len(actual) != len(expected):
            return f"expected a {type(expected).__name__} of {len(expected)} items, got {_describe(actual)}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            problem = compare(e, a, atol, rtol, equal_nan)
            if problem:
                return f"item {i}: {problem}"
        return None
    if isinstance(expected, bool) or expected is None:
        return None if actual is expected else f"expected {expected!r}, got {actual!r}"
    if isinstance(expected, numbers.Integral):
        if isinstance(actual, bool) or not isinstance(actual, numbers.Integral):
            return f"expected the int {expected}, got {_describe(actual)}"
        return None if actual == expected else f"expected {expected}, got {actual}"
    if isinstance(expected, numbers.Real):
        if not isinstance(actual, numbers.Real) or isinstance(actual, bool):
            return f"expected a number, got {_describe(actual)}"
        return None if math.isclose(actual, expected, rel_tol=rtol, abs_tol=atol) else f"expected {expected:g}, got {actual:g}"
    return None if actual == expected else f"expected {expected!r}, got {actual!r}"


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    if isinstance(x, (int, float)):
        return f"the {type(x).__name__} {x!r}"
    return f"a {type(x).__name__}"


def same_outcome(a: Outcome, b: Outcome, atol: float, rtol: float) -> bool:
    """Did two implementations do the same thing: equal values, or the same GradingError?

    Other exceptions never match: two different mistakes often crash in the same reshape with the same
    message, and naming the wrong mistake is worse than naming none.
    """
    if a.error is not None or b.error is not None:
        return isinstance(a.error, GradingError) and isinstance(b.error, GradingError) and str(a.error) == str(b.error)
    return compare(a.value, b.value, atol, rtol, equal_nan=True) is None


def _error_message(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
