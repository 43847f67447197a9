"""A lesson's length has one source, the README's course map: each estimate covers the minutes its exercises'
task lines give plus some reading, and lesson 00 quotes the map's range and its longest lesson."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parent.parent
READING_MINUTES = 10  # the least a lesson's prose, figures and runs take beyond its exercises
ROW = re.compile(r"^\| (\d\d) \| \[[^\]]+\]\(lessons/\d\d_\w+\.ipynb\) \|.*\| (\d+) min \|", re.M)
TASK_MINUTES = re.compile(r"^Difficulty: [🔴⚪]{5} · Importance: [🔵⚪]{5} · ~(\d+) min$", re.M)


def readme_estimates() -> dict[str, int]:
    return {lesson: int(minutes) for lesson, minutes in ROW.findall((REPO / "README.md").read_text(encoding="utf-8"))}


def exercise_minutes(lesson: str) -> int:
    path = next((REPO / "solutions").glob(f"{lesson}_*.ipynb"))
    cells = nbformat.read(path, as_version=4).cells
    return sum(int(m) for c in cells if c.cell_type == "markdown" for m in TASK_MINUTES.findall(c.source))


def test_the_course_map_gives_every_lesson_a_time():
    lessons = sorted(p.name[:2] for p in (REPO / "solutions").glob("[0-9][0-9]_*.ipynb"))
    assert sorted(readme_estimates()) == lessons


def test_each_estimate_covers_its_exercises_and_some_reading():
    for lesson, minutes in readme_estimates().items():
        needed = exercise_minutes(lesson)
        if needed:
            assert minutes >= needed + READING_MINUTES, (
                f"lesson {lesson}: the README gives {minutes} min, its exercises' task lines add up to {needed}")


def test_lesson_00_quotes_the_course_maps_range_and_longest_lesson():
    estimates = {k: v for k, v in readme_estimates().items() if k != "00"}
    text = "\n".join(c.source for c in nbformat.read(REPO / "solutions" / "00_welcome.ipynb", as_version=4).cells
                     if c.cell_type == "markdown")
    sentence = re.search(r"Each lesson takes (\d+) to (\d+) minutes[^;]*; lesson (\d\d) \([^)]*\) is the longest", text)
    assert sentence, "lesson 00 says how long a lesson takes, and which is the longest"
    low, high, longest = sentence.groups()
    assert (int(low), int(high)) == (min(estimates.values()), max(estimates.values()))
    assert [k for k, v in estimates.items() if v == int(high)] == [longest]
