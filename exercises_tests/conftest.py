"""Graded tests: grade the exercises of the notebooks in one folder.

    pytest exercises_tests                                     grade solutions/ (every test passes)
    pytest exercises_tests --notebooks lessons                 grade the student notebooks (every test fails
                                                               until the learner solves the exercise)
    pytest exercises_tests --notebooks lessons --expect-fail   CI: pass only if *every* exercise fails there,
                                                               i.e. the generated lessons really are stubs
    pytest exercises_tests -k vit      (or -k 01)              one lesson

Nothing in a notebook runs except its imports, defs, classes and literal constants (see
vlm_course.grading.extract), so grading takes seconds and needs no network.

A failed graded test reports its hint, not a traceback (the learner reads "❌ patchify: patches come out in
column-major order - ..."). For pytest's full report, pass a traceback style: `--tb=long` (or `--tb=short`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Grading never downloads anything; say so before transformers or huggingface_hub get imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLM_COURSE_OFFLINE", "1")


def pytest_addoption(parser):
    group = parser.getgroup("vlm_course grading")
    group.addoption("--notebooks", default="solutions",
                    help="folder of NN_*.ipynb notebooks to grade, relative to the repository root (default: solutions)")
    group.addoption("--expect-fail", action="store_true",
                    help="invert: every graded exercise must FAIL (checks that lessons/ holds only stubs)")


def pytest_report_header(config):
    return f"grading notebooks in: {notebooks_dir(config)}" + ("  (expecting every exercise to fail)"
                                                              if config.getoption("--expect-fail") else "")


def notebooks_dir(config) -> Path:
    folder = Path(config.getoption("--notebooks"))
    return folder if folder.is_absolute() else REPO_ROOT / folder


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Compact reports by default: a failed grading assertion shows its message (the hint lines) only."""
    outcome = yield
    report = outcome.get_result()
    if (report.failed and call.excinfo is not None and call.excinfo.errisinstance(AssertionError)
            and item.config.getoption("tbstyle") == "auto"):
        report.longrepr = f"{item.nodeid}\n{call.excinfo.value}"


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--expect-fail"):
        return
    reason = "--expect-fail: a student notebook must not pass its exercises before they are solved"
    for item in items:
        item.add_marker(pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason))


@pytest.fixture(scope="session")
def notebook_namespaces(request):
    """Extracted definitions per notebook file name, computed once per session."""
    from vlm_course.grading import extract_definitions

    folder = notebooks_dir(request.config)
    cache: dict[str, dict] = {}

    def get(notebook_name: str) -> dict:
        if notebook_name not in cache:
            path = folder / notebook_name
            if not path.exists():
                pytest.fail(f"no notebook {path} to grade (--notebooks {request.config.getoption('--notebooks')})")
            cache[notebook_name] = extract_definitions(path)
        return cache[notebook_name]

    return get


@pytest.fixture
def notebook(request, notebook_namespaces):
    """The extracted namespace of the test module's notebook (the module sets NOTEBOOK = "NN_name.ipynb")."""
    return notebook_namespaces(request.module.NOTEBOOK)
