"""Tests of the grading system (vlm_course.grading) and of the lesson plots (vlm_course.viz).

The central one is the meta-test: for every registered exercise, the reference passes the graded checks
and every known-wrong implementation (mutant) fails them, with its own hint. A graded check that a
plausible mistake can pass is a defect; this file is what proves there is none among the mutants we know.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import nbformat
import pytest
import torch
import torch.nn as nn

from vlm_course.config import PROFILES, VisionConfig
from vlm_course.grading import all_exercises, check, extract_definitions, get_exercise, grade
from vlm_course.grading.core import Case, Exercise, Mutant, compare
from vlm_course.grading.exercises import l01_vit_patching as l01
from vlm_course.grading.exercises import l02_projector as l02
from vlm_course.grading.extract import ERRORS_KEY
from vlm_course.grading.sync import (
    BEGIN,
    END,
    clean_solution,
    lesson_from_solution,
    normalise,
    stub_source,
    sync_lessons,
)
from vlm_course.vision import PatchEmbedding, VisionBlock

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parent.parent
EXERCISES = all_exercises()
MUTANTS = [(ex, m) for ex in EXERCISES for m in ex.mutants]


# ----------------------------------------------------------------------------------------------
# The meta-test: references pass, mutants fail with their hint


@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda ex: ex.name)
def test_reference_passes(exercise):
    report = grade(exercise, exercise.reference)
    assert report.passed, report.line()
    assert report.checks == len(exercise.cases)


@pytest.mark.parametrize(("exercise", "mutant"), MUTANTS, ids=[f"{ex.name}-{m.name}" for ex, m in MUTANTS])
def test_mutant_is_caught_with_its_hint(exercise, mutant):
    report = grade(exercise, mutant.impl)
    assert report.status == "failed", f"the plausible mistake {mutant.name!r} passes the checks of {exercise.name}"
    failing_case = exercise.cases[report.checks - 1]
    if failing_case.raises is None:  # on bad-input cases the message names the input, not a mutant
        assert mutant.hint in report.message, f"{mutant.name} was caught but explained as: {report.line()}"


@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda ex: ex.name)
def test_exercise_is_well_formed(exercise):
    assert len(exercise.mutants) >= 2, "each exercise keeps at least two plausible wrong implementations"
    assert len(exercise.cases) >= 3, "each exercise checks several seeded inputs"
    assert len({c.name for c in exercise.cases}) == len(exercise.cases), "case names identify the failing check"
    assert len(exercise.lesson) == 2 and exercise.lesson.isdigit()


@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda ex: ex.name)
def test_cases_are_seeded_and_fresh(exercise):
    """Inputs are rebuilt identically for every call: learner code that edits its inputs in place cannot
    corrupt the reference's inputs, and grading is deterministic."""
    for case in exercise.cases:
        first, second = case.inputs(), case.inputs()
        for a, b in zip(first, second):
            if isinstance(a, torch.Tensor):
                assert a is not b and torch.equal(a, b), case.name


def test_exercise_names_are_unique_and_found():
    names = [ex.name for ex in EXERCISES]
    assert len(names) == len(set(names))
    assert get_exercise("patchify").lesson == "01"
    with pytest.raises(KeyError, match="no exercise named"):
        get_exercise("nope")


def test_in_place_edits_do_not_fool_the_grader():
    def patchify_that_scribbles(images, p):
        out = l01.patchify(images, p).clone()
        images.zero_()  # a learner bug that must not zero the reference's input too
        return out

    assert grade(get_exercise("patchify"), patchify_that_scribbles).passed


# ----------------------------------------------------------------------------------------------
# The references agree with the library they stand for


def test_patchify_and_conv_to_linear_reproduce_patch_embedding():
    cfg = VisionConfig(image_size=24, patch_size=4, hidden_size=12, num_heads=3)
    embed = PatchEmbedding(cfg)
    pixels = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        expected = embed(pixels) - embed.position_embedding.weight
        got = l01.conv_to_linear(embed.patch_embedding)(l01.patchify(pixels, 4))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_image_tokens_reference_matches_config(profile):
    cfg = PROFILES[profile].config
    assert l02.image_tokens(cfg.vision.image_size, cfg.vision.patch_size, cfg.projector.shuffle_factor) == \
        cfg.image_tokens_per_image


def test_vit_block_reference_is_the_library_block():
    assert get_exercise("ViTBlock").reference is VisionBlock


# ----------------------------------------------------------------------------------------------
# check(): one line, never a traceback


def test_check_pass_line(capsys):
    check("patchify", l01.patchify)
    assert capsys.readouterr().out == "✅ patchify: 5 checks passed\n"


def test_check_not_implemented(capsys):
    def patchify(images, patch_size):
        raise NotImplementedError("patchify is not implemented yet")

    check("patchify", patchify)
    assert capsys.readouterr().out == "⏳ patchify: not implemented yet\n"


def test_check_names_an_unfinished_helper(capsys):
    def multi_head_attention(x, attn):
        raise NotImplementedError("scaled_dot_product_attention is not implemented yet")

    check("multi_head_attention", multi_head_attention)
    assert "not implemented yet (scaled_dot_product_attention is not implemented yet)" in capsys.readouterr().out


def test_check_hint_for_a_known_mistake(capsys):
    check("patchify", l01.patchify_column_major)
    out = capsys.readouterr().out
    assert out.startswith("❌ patchify: patches come out in column-major order - flatten rows first")
    assert "[check: batch 2, 3x16x16 images, patch 4]" in out


@pytest.mark.parametrize("obj", [None, 42, "patchify"])
def test_check_wrong_objects(capsys, obj):
    check("patchify", obj)
    out = capsys.readouterr().out
    assert out.startswith("❌ patchify: expected a function or class named patchify"), out


def test_check_reports_exceptions_without_traceback(capsys):
    check("patchify", lambda images: images)  # wrong signature -> TypeError
    out = capsys.readouterr().out
    assert out.startswith("❌ patchify: raised TypeError") and "Traceback" not in out


def test_check_unknown_exercise(capsys):
    check("patchfy", l01.patchify)
    assert capsys.readouterr().out.startswith("❌ no exercise named 'patchfy'")


def test_check_finds_the_object_in_the_callers_namespace(capsys):
    exec("check('image_tokens')", {"check": check, "image_tokens": l02.image_tokens})
    assert capsys.readouterr().out == "✅ image_tokens: 7 checks passed\n"


def test_check_explains_mismatched_parameter_names(capsys):
    class ViTBlock(nn.Module):  # right maths, wrong names: checkpoints would not load
        def __init__(self, cfg):
            super().__init__()
            self.inner = VisionBlock(cfg)

        def forward(self, x):
            return self.inner(x)

    check("ViTBlock", ViTBlock)
    out = capsys.readouterr().out
    assert "ViTBlock's parameters do not match VisionBlock's" in out and "missing ['layer_norm1.weight'" in out


def test_check_bias_projector_gets_load_error_and_hint(capsys):
    check("Projector", l02._BiasProjector)
    out = capsys.readouterr().out
    assert "unexpected ['proj.bias']" in out and "without bias" in out


def test_check_wrong_dtype_is_named(capsys):
    check("scaled_dot_product_attention", lambda q, k, v: l01.scaled_dot_product_attention(q, k, v).float())
    assert "wrong dtype: expected torch.float64, got torch.float32" in capsys.readouterr().out


def test_check_image_tokens_float(capsys):
    check("image_tokens", lambda s, p, r: float(l02.image_tokens(s, p, r)))
    assert "return an int" in capsys.readouterr().out


def test_bad_input_cases_say_what_to_raise(capsys):
    check("image_tokens", lambda s, p, r: (s // p) ** 2 // r**2)  # right formula, no input checks
    out = capsys.readouterr().out
    assert "should raise ValueError with a clear message for this input, but it returned the int 21" in out
    assert "the 14x14 grid is not divisible by 3" in out


# ----------------------------------------------------------------------------------------------
# compare()


@pytest.mark.parametrize(("expected", "actual", "fragment"), [
    (torch.zeros(2, 3), torch.zeros(3, 2), "wrong shape: expected (2, 3), got (3, 2)"),
    (torch.zeros(2), torch.zeros(2, dtype=torch.float64), "wrong dtype"),
    (torch.zeros(2), torch.tensor([0.0, 1.0]), "max abs difference 1"),
    (torch.zeros(2), [0.0, 0.0], "expected a torch.Tensor, got list"),
    (torch.zeros(2), torch.tensor([0.0, float("nan")]), "wrong values"),
    (49, 49.0, "expected the int 49, got the float 49.0"),
    (49, True, "expected the int 49"),
    (49, 48, "expected 49, got 48"),
    ((torch.zeros(1), 3), (torch.zeros(1), 4), "item 1: expected 3, got 4"),
])
def test_compare_explains_differences(expected, actual, fragment):
    assert fragment in compare(expected, actual, atol=1e-5, rtol=1e-5)


def test_compare_accepts_matches():
    assert compare(torch.ones(3), torch.ones(3) + 1e-7, 1e-5, 1e-5) is None
    assert compare(49, 49, 0, 0) is None
    assert compare((torch.ones(1), 2), [torch.ones(1), 2], 0, 0) is None


def test_grading_a_tiny_custom_exercise():
    """The README's recipe: an exercise is a reference, seeded cases and mutants."""
    exercise = Exercise(
        name="double", lesson="99", reference=lambda x: 2 * x,
        cases=[Case("a vector", lambda: (torch.arange(3.0),)), Case("a matrix", lambda: (torch.ones(2, 2),))],
        mutants=[Mutant("square", lambda x: x * x, "you squared instead of doubling")],
    )
    assert grade(exercise, lambda x: x + x).passed
    report = grade(exercise, lambda x: x**2)
    assert report.line() == "❌ double: you squared instead of doubling  [check: a vector]"
    exercise.uses = ("add",)  # an unexplained failure points at the earlier exercise the code builds on
    assert grade(exercise, lambda x: x + 1).message.endswith("if your code calls your add, make sure that passes its check first")


# ----------------------------------------------------------------------------------------------
# extract_definitions()


def _notebook(tmp_path: Path, sources: list[str], name: str = "99_test.ipynb") -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nb.cells.insert(0, nbformat.v4.new_markdown_cell("# not code: ignored"))
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


def test_extract_runs_definitions_only(tmp_path):
    marker = tmp_path / "side_effect"
    path = _notebook(tmp_path, [
        "%matplotlib inline\n!pip install nothing\nimport math\nfrom pathlib import Path",
        "SIZE = 16\nNAMES = ('a', 'b')\nmodel = build_a_big_model()  # a call: skipped",
        "def area(side):\n    return side * side\n\nprint(area(SIZE))",
        f"Path({str(marker)!r}).write_text('ran')\nraise RuntimeError('heavy cell ran')",
        "class Box:\n    side = SIZE\n    def area(self):\n        return area(self.side)",
        "def area(side):  # redefined further down: the later one wins\n    return side ** 2 + 0",
        "if True:\n    %time x = 1\n    def hidden():\n        pass",
        "def broken(:\n    pass",
        "import module_that_does_not_exist_xyz",
    ])
    ns = extract_definitions(path)
    assert not marker.exists(), "a top-level call ran during extraction"
    assert ns["SIZE"] == 16 and ns["NAMES"] == ("a", "b") and "model" not in ns
    assert ns["math"].sqrt(4) == 2 and ns["Box"]().area() == 256
    assert ns["area"](3) == 9 and "hidden" not in ns  # defs nested in an `if` are not top-level definitions
    errors = "\n".join(ns[ERRORS_KEY])
    assert "99_test.ipynb cell 8 has a syntax error" in errors
    assert "ModuleNotFoundError" in errors and "module_that_does_not_exist_xyz" in errors


@pytest.mark.parametrize("lesson", sorted({ex.lesson for ex in EXERCISES}))
def test_notebooks_define_every_registered_exercise(lesson):
    """Every registered exercise is defined in its lesson's solution (and passes) and is a stub in the lesson."""
    solutions = sorted((REPO / "solutions").glob(f"{lesson}_*.ipynb"))
    assert len(solutions) == 1, f"exercises are registered for lesson {lesson} but solutions/ has {solutions}"
    student = REPO / "lessons" / solutions[0].name
    assert student.exists(), f"no {student.name} in lessons/: run python -m vlm_course.grading.sync"
    solved, stubbed = extract_definitions(solutions[0]), extract_definitions(student)
    for exercise in all_exercises(lesson):
        assert exercise.name in solved, f"{solutions[0].name} defines no {exercise.name}"
        assert grade(exercise, solved[exercise.name]).passed, f"{solutions[0].name}: {exercise.name}"
        assert grade(exercise, stubbed[exercise.name]).status == "not_implemented", f"{student.name}: {exercise.name}"


# ----------------------------------------------------------------------------------------------
# sync: lessons from solutions


SOLUTION_CELL = f'''class Block:
    def forward(self, x):
        """Docstring stays."""
        {BEGIN}
        {"### HINT: add the residual"}
        return x + 1
        {END}

def top():
    {BEGIN}
    return 2
    {END}'''


def test_stub_source_keeps_signature_docstring_and_hints():
    stub = stub_source(SOLUTION_CELL)
    assert stub.splitlines() == [
        "class Block:",
        "    def forward(self, x):",
        '        """Docstring stays."""',
        "        # Hint: add the residual",
        '        raise NotImplementedError("Block.forward is not implemented yet")',
        "",
        "def top():",
        '    raise NotImplementedError("top is not implemented yet")',
    ]


def test_stub_source_top_level_region_and_errors():
    assert stub_source(f"{BEGIN}\nx = 1\n{END}") == 'raise NotImplementedError("this exercise is not implemented yet")'
    with pytest.raises(ValueError, match="no matching"):
        stub_source(f"def f():\n    {BEGIN}\n    return 1")
    with pytest.raises(ValueError, match="without a matching"):
        stub_source(f"def f():\n    return 1\n    {END}")


def _solution(tmp_path: Path, name="01_demo.ipynb") -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"state": "noise"}
    md = nbformat.v4.new_markdown_cell("# Demo")
    md.metadata["collapsed"] = True
    solved = nbformat.v4.new_code_cell(SOLUTION_CELL, execution_count=7)
    solved.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n")]
    checked = nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nprint('x' * 5000)", execution_count=8)
    checked.outputs = [nbformat.v4.new_output("stream", name="stdout", text="x" * 5000 + "\n")]
    plotted = nbformat.v4.new_code_cell("plot()", execution_count=9)
    plotted.outputs = [
        nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"}),
        nbformat.v4.new_output("stream", name="stderr", text="/home/me/warning.py:1: UserWarning\n"),
        nbformat.v4.new_output("stream", name="stdout", text="y" * 5000),
    ]
    nb.cells = [md, solved, checked, plotted]
    path = tmp_path / "solutions" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def test_lesson_is_stubbed_cleared_and_deterministic(tmp_path):
    solution = _solution(tmp_path)
    text = lesson_from_solution(solution)
    assert text == lesson_from_solution(solution)
    nb = nbformat.reads(text, as_version=4)
    assert nb.metadata == {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                                          "name": "python3"}, "language_info": {"name": "python"}}
    assert all(c.metadata == {} for c in nb.cells)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert "raise NotImplementedError" in code[0].source and "return x + 1" not in code[0].source
    assert [c.id for c in nb.cells] == [c.id for c in nbformat.read(solution, as_version=4).cells]
    json.loads(text)  # valid JSON, written by nbformat with sorted keys


def test_clean_keeps_small_text_outputs_only(tmp_path):
    solution = _solution(tmp_path)
    cleaned = nbformat.reads(clean_solution(solution), as_version=4)
    solved, checked, plotted = cleaned.cells[1:]
    assert [o.text for o in solved.outputs] == ["hello\n"] and solved.execution_count == 1
    assert len(checked.outputs[0].text) == 5001, "NBVAL_CHECK_OUTPUT cells keep their text whatever its size"
    assert plotted.outputs == [] and plotted.execution_count is None, "images, stderr and big text are dropped"
    solution.write_text(clean_solution(solution))
    assert clean_solution(solution) == solution.read_text(), "clean is idempotent"


def test_sync_check_detects_stale_missing_and_orphan_lessons(tmp_path, capsys):
    solutions, lessons = _solution(tmp_path).parent, tmp_path / "lessons"
    assert sync_lessons(solutions, lessons, check=True) == 1  # missing
    assert "out of sync: " in capsys.readouterr().err
    assert sync_lessons(solutions, lessons, check=False) == 0
    assert sync_lessons(solutions, lessons, check=True) == 0
    (lessons / "01_demo.ipynb").write_text((lessons / "01_demo.ipynb").read_text().replace("Demo", "Edited"))
    assert sync_lessons(solutions, lessons, check=True) == 1  # edited by hand
    sync_lessons(solutions, lessons, check=False)
    (lessons / "02_orphan.ipynb").write_text("{}")
    assert sync_lessons(solutions, lessons, check=True) == 1
    assert "02_orphan.ipynb has no solution notebook" in capsys.readouterr().err


def test_normalise_gives_stable_unique_ids():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("a"), nbformat.v4.new_code_cell("b")]
    nb.cells[1].id = nb.cells[0].id  # duplicate
    first, second = normalise(nb, keep_outputs=False), normalise(nb, keep_outputs=False)
    assert [c.id for c in first.cells] == [c.id for c in second.cells]
    assert len({c.id for c in first.cells}) == 2


def test_repository_lessons_are_in_sync_and_solutions_clean():
    assert sync_lessons(REPO / "solutions", REPO / "lessons", check=True) == 0
    for solution in sorted((REPO / "solutions").glob("[0-9][0-9]_*.ipynb")):
        assert clean_solution(solution) == solution.read_text(encoding="utf-8"), f"run: sync clean ({solution.name})"


# ----------------------------------------------------------------------------------------------
# viz: every plot draws without a display, widgets fall back to static figures


def test_viz_plots_draw(monkeypatch):
    import matplotlib.pyplot as plt

    from vlm_course import viz
    from vlm_course.weights import assets_dir

    monkeypatch.setattr(plt, "show", lambda *a, **k: None)
    image = assets_dir() / "images" / "shapes.png"
    patches = l01.patchify(torch.rand(1, 3, 32, 48), 8)
    weights = torch.softmax(torch.randn(24, 24), dim=-1)
    figures = [
        viz.show_patch_grid(image, 16, show=False),
        viz.show_patch(torch.rand(3, 32, 48), 8, 5, show=False),
        viz.plot_patch_sequence(patches, 8, show=False),
        viz.plot_position_similarity(torch.randn(16, 8), 4, show=False),
        viz.plot_attention_map(torch.rand(3, 32, 48), weights, 8, 3, show=False),
        viz.plot_attention_maps(torch.rand(3, 32, 48), weights, 8, [0, 23], show=False),
        viz.plot_pixel_shuffle(4, 2, show=False),
        viz.plot_tokens_vs_resolution(l02.image_tokens, 16, marks={"nanoVLM": (224, 16, 2)}, show=False),
    ]
    assert all(isinstance(f, matplotlib.figure.Figure) for f in figures)
    assert not viz.in_live_kernel()
    viz.patch_explorer(image, 16, index=3)  # no kernel: a static figure, no exception
    viz.attention_explorer(torch.rand(3, 32, 48), weights, 8, query=2)
    plt.close("all")


def test_sample_images_are_small_and_reproducible(tmp_path):
    import importlib.util

    folder = REPO / "assets" / "images"
    spec = importlib.util.spec_from_file_location("make_images", folder / "make_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("shapes", "street", "chart"):
        path = folder / f"{name}.png"
        assert path.stat().st_size <= 50_000
        module.__dict__[name]().save(tmp_path / "again.png", optimize=True)
        from PIL import Image

        assert list(Image.open(tmp_path / "again.png").getdata()) == list(Image.open(path).getdata())

