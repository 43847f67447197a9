"""Every exercise of the lessons listed here teaches before it tells.

Each exercise cell (a solution region in solutions/) is announced by a one-line task with difficulty,
importance and expected minutes, and preceded by collapsed help the learner opens on purpose: a nudge, a
stronger hint, the solution. The solution shown is the solution notebook's own code (so the two cannot
drift apart), and the stub the sync tool writes into lessons/ says what to write and the shapes in and
out, not the solution.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import nbformat
import pytest

from vlm_course.grading.sync import BEGIN, END, HINT, lesson_from_solution

REPO = Path(__file__).resolve().parent.parent
LESSONS_WITH_HELP = ("01", "02", "03", "04", "05", "06", "07", "08", "09")
META = re.compile(r"^\*\*Exercise [^*]+\*\*: .+\n\nDifficulty: [🔴⚪]{5} · Importance: [🔵⚪]{5} · ~\d+ min$", re.M)
SOLUTION = re.compile(r"<details><summary>Solution</summary>\n\n```python\n(.*?)\n```\n\n</details>", re.S)


def _exercises(lesson: str):
    """(markdown cells above, help cell, exercise cell) for every exercise cell of a solution notebook."""
    path = next((REPO / "solutions").glob(f"{lesson}_*.ipynb"))
    nb = nbformat.read(path, as_version=4)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and BEGIN in cell.source:
            above = [c.source for c in nb.cells[:index] if c.cell_type == "markdown"]
            yield path.name, above, nb.cells[index - 1], cell


CELLS = [pytest.param(lesson, above, help_cell, cell, id=f"{name}-{number}")
         for lesson in LESSONS_WITH_HELP
         for number, (name, above, help_cell, cell) in enumerate(_exercises(lesson))]


def _solution_code(source: str) -> str:
    return "\n".join(line for line in source.split("\n")
                     if line.strip() not in (BEGIN, END) and not line.strip().startswith(HINT)).strip()


@pytest.mark.parametrize(("lesson", "above", "help_cell", "cell"), CELLS)
def test_exercise_has_metadata_and_progressive_help(lesson, above, help_cell, cell):
    assert META.search(above[-1]) or META.search(above[-2]), "task line with difficulty, importance and minutes"
    assert help_cell.cell_type == "markdown", "the help cell sits right above the exercise cell"
    summaries = re.findall(r"<details><summary>([^<]+)</summary>", help_cell.source)
    assert summaries == ["Nudge", "Stronger hint", "Solution"]
    shown = SOLUTION.search(help_cell.source)
    assert shown and shown.group(1) == _solution_code(cell.source), "the Solution block is the solution's own code"


@pytest.mark.parametrize(("lesson", "above", "help_cell", "cell"), CELLS)
def test_stub_gives_no_solution_code(lesson, above, help_cell, cell):
    """No run of the solution's code (string literals aside) reappears in a hint: the stub says what, not how.
    (The hints these replaced shared 26 to 59 characters with their solutions, e.g.
    'x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)'.)"""
    hints = [line.strip()[len(HINT):].strip() for line in cell.source.split("\n") if line.strip().startswith(HINT)]
    assert hints, "each solution region has a hint line: what to write, shapes in and out"
    body = "\n".join(line.strip() for line in _solution_code(cell.source).split("\n")
                     if line.strip() and not line.strip().startswith(("def ", "class ", '"""', "#", "@")))
    body = re.sub(r'f?"[^"\n]*"', '""', body)  # error messages may say what the hint says
    for hint in hints:
        assert len(hint) <= 120
        match = difflib.SequenceMatcher(None, hint, body, autojunk=False).find_longest_match(0, len(hint), 0, len(body))
        assert match.size < 24, f"the hint {hint!r} gives away {hint[match.a:match.a + match.size]!r}"


@pytest.mark.parametrize("lesson", LESSONS_WITH_HELP)
def test_lesson_stub_keeps_the_help_and_drops_the_solution_region(lesson):
    path = next((REPO / "solutions").glob(f"{lesson}_*.ipynb"))
    lesson_nb = nbformat.reads(lesson_from_solution(path), as_version=4)
    code = "\n".join(c.source for c in lesson_nb.cells if c.cell_type == "code")
    assert BEGIN not in code and "not implemented yet" in code
    assert sum("<summary>Solution</summary>" in c.source for c in lesson_nb.cells if c.cell_type == "markdown") == \
        len([p for p in CELLS if p.values[0] == lesson])
