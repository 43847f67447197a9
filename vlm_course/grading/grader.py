"""The grader: run a learner's function on seeded inputs, compare with the reference, name the mistake.

Grading one object:

    for each case:  expected = reference(case inputs),  actual = learner(case inputs)
                    equal (within tolerance)?  next case
                    else: does `actual` equal some mutant's output on this case?  -> that mutant's hint
                          otherwise                                                -> what differs (shape, dtype, values)

A mutant is recognised by what it does, not by how it is written: the learner's output is compared with
the mutant's on the same inputs, whatever API produced either. Two allowances make that hold for the same
mistake written another way: a slightly looser tolerance (another order of float operations), and
positions where the mutant's output is NaN count as undefined (a causal mask that hides every key from a
query gives NaN with a hand-written softmax but zeros with F.scaled_dot_product_attention: the same
mistake). When no mutant explains a failure and the exercise calls earlier ones (`uses`), the learner's
own versions of those are graded: a failing helper is named, a passing one is not blamed (which is why
this module, unlike core.py, looks exercises up in the catalog).
"""

from __future__ import annotations

import functools
import inspect
import sys

from .catalog import get_exercise
from .core import (
    Case,
    Exercise,
    GradingError,
    Outcome,
    Report,
    _describe,
    _error_message,
    compare,
    run,
    same_outcome,
)


def grade(exercise: Exercise, impl) -> Report:
    """Run every case; stop at the first failure and explain it."""
    if impl is None or not callable(impl):
        return Report(exercise.name, "failed", 0,
                      f"expected a function or class named {exercise.name}, got {_describe(impl)}")
    for number, case in enumerate(exercise.cases, 1):
        problem = grade_case(exercise, impl, case)
        if problem is None:
            continue
        status, message = problem
        return Report(exercise.name, status, number, message, case.name)
    return Report(exercise.name, "passed", len(exercise.cases))


def grade_case(exercise: Exercise, impl, case: Case) -> tuple[str, str] | None:
    """None if `impl` passes `case`; else (status, message)."""
    atol = exercise.atol if case.atol is None else case.atol
    rtol = exercise.rtol if case.rtol is None else case.rtol
    actual = run(exercise, impl, case)

    if isinstance(actual.error, NotImplementedError):
        # The stub itself, or a helper it calls that is still a stub: say which.
        detail = str(actual.error)
        named_other = detail and exercise.name not in detail.split(" ")[0]
        return "not_implemented", (f" ({detail})" if named_other else "")

    if case.raises is not None:
        # Bad input must be refused with a clear error. The case's name says what is wrong with the input,
        # which is the most useful hint here (mutants are not consulted: they are not about input checks).
        if isinstance(actual.error, case.raises):
            return None
        got = f"raised {_error_message(actual.error)}" if actual.error else f"returned {_describe(actual.value)}"
        return "failed", f"should raise {case.raises.__name__} with a clear message for this input, but it {got}"

    if isinstance(actual.error, GradingError):  # e.g. parameter names that do not match the reference
        hint = diagnose(exercise, case, actual, atol, rtol)
        return "failed", f"{actual.error}" + (f" - {hint}" if hint else "")
    if actual.error is not None:
        return "failed", f"raised {_error_message(actual.error)}"

    expected = run(exercise, exercise.reference, case)
    if expected.error is not None:  # a broken reference is a course bug, not the learner's
        raise RuntimeError(f"reference for {exercise.name} failed on case {case.name!r}") from expected.error
    problem = compare(expected.value, actual.value, atol, rtol)
    if problem is None:
        return None
    hint = diagnose(exercise, case, actual, atol, rtol)
    if hint is None and exercise.uses:
        problem += helpers_note(exercise, impl)
    return "failed", hint or problem


# Recognising a mutant tolerates another order of float operations (the same mistake written with another
# API): mutants differ from the reference and from each other by far more than this.
MUTANT_TOLERANCE_FACTOR = 10.0


def diagnose(exercise: Exercise, case: Case, actual: Outcome, atol: float, rtol: float) -> str | None:
    """The hint of the first mutant that does what the learner's code did on this case."""
    atol, rtol = atol * MUTANT_TOLERANCE_FACTOR, rtol * MUTANT_TOLERANCE_FACTOR
    for mutant in exercise.mutants:
        if same_outcome(run(exercise, mutant.impl, case), actual, atol, rtol):
            return mutant.hint
    return None


def learner_namespace(impl) -> dict:
    """The globals the learner's function (or class's methods) see: where its helpers are looked up."""
    while isinstance(impl, functools.partial):
        impl = impl.func
    if isinstance(impl, type):
        for attr in vars(impl).values():
            if inspect.isfunction(attr):
                return attr.__globals__
        module = sys.modules.get(impl.__module__)
        return vars(module) if module else {}
    return getattr(inspect.unwrap(impl), "__globals__", {})


def helpers_note(exercise: Exercise, impl) -> str:
    """What to say about the earlier exercises this one calls, when no mutant explains the failure.

    The learner's own helpers (found where the learner's code looks them up) are graded: one that fails its
    check is named with its own message; one that passes is not blamed. A helper not found is mentioned
    as a possibility only.
    """
    namespace, failing, unknown = learner_namespace(impl), [], []
    for name in exercise.uses:
        helper = namespace.get(name)
        if helper is None:
            unknown.append(name)
            continue
        report = grade(get_exercise(name), helper)
        if not report.passed:
            failing.append(f"your {name} does not pass its own check yet ({report.line().lstrip('❌⏳ ')}): fix it first")
    if failing:
        return " - " + "; ".join(failing)
    if unknown:
        return f" - if your code calls your {' / '.join(unknown)}, make sure that passes its check first"
    return ""
