"""The course's repository is one setting ([tool.vlm_course] in pyproject.toml), which the sync tool writes into
every notebook's Colab install cell and the README's Colab badges; a fork changes the setting and runs the sync."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from vlm_course.grading.sync import (
    REPO_URL_COMMENT,
    CourseRepository,
    course_repository,
    main,
    with_colab_links,
    with_repository_url,
)

REPO = Path(__file__).resolve().parent.parent
INSTALL_CELL = '''# Colab only: install the course and its library (this cell does nothing anywhere else).
import sys

COURSE_REPO_URL = "https://github.com/SOMEONE/elsewhere.git"  # an old comment
if "google.colab" in sys.modules:
    print(COURSE_REPO_URL)'''
FORK = "https://github.com/a-fork/vlm-course"


def test_the_repository_notebooks_and_readme_use_the_one_setting():
    repository = course_repository()
    for folder in ("solutions", "lessons"):
        for path in sorted((REPO / folder).glob("[0-9][0-9]_*.ipynb")):
            sources = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
            lines = [line for s in sources for line in s.split("\n") if line.lstrip().startswith("COURSE_REPO_URL")]
            assert lines == [f'COURSE_REPO_URL = "{repository.clone_url}"  {REPO_URL_COMMENT}'], path.name
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"https://colab\.research\.google\.com/github/\S+?\.ipynb", readme)
    lessons = sorted(p.name for p in (REPO / "lessons").glob("[0-9][0-9]_*.ipynb"))
    assert links == [f"{repository.colab_prefix}lessons/{name}" for name in lessons]


def test_urls_from_the_setting():
    repository = CourseRepository(FORK + ".git", branch="course")
    assert (repository.owner, repository.name) == ("a-fork", "vlm-course")
    assert repository.clone_url == FORK + ".git"
    assert repository.colab_prefix == "https://colab.research.google.com/github/a-fork/vlm-course/blob/course/"
    assert CourseRepository(FORK + "/").clone_url == FORK + ".git"


@pytest.mark.parametrize("url", ["https://gitlab.com/a/b", "git@github.com:a/b.git", "https://github.com/only-owner"])
def test_a_url_colab_cannot_open_is_refused_with_a_clear_message(url):
    with pytest.raises(ValueError, match="must be a GitHub URL"):
        CourseRepository(url)


def test_a_pyproject_without_the_setting_says_what_to_add(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n', encoding="utf-8")
    with pytest.raises(KeyError, match=r"\[tool.vlm_course\] repository"):
        course_repository(tmp_path / "pyproject.toml")


def test_install_line_and_badges_are_rewritten_and_nothing_else():
    repository = CourseRepository(FORK)
    source = with_repository_url(INSTALL_CELL, repository)
    assert f'COURSE_REPO_URL = "{FORK}.git"  {REPO_URL_COMMENT}' in source.split("\n")
    assert source.replace(f'"{FORK}.git"  {REPO_URL_COMMENT}', "") == \
        INSTALL_CELL.replace('"https://github.com/SOMEONE/elsewhere.git"  # an old comment', "")
    assert with_repository_url(source, repository) == source
    assert with_repository_url("x = 1\nprint(COURSE_REPO_URL)", repository) == "x = 1\nprint(COURSE_REPO_URL)"
    badge = ("| 01 | [ViT](lessons/01_vit_patching.ipynb) | [![Open in Colab](https://colab.research.google.com/"
             "assets/colab-badge.svg)](https://colab.research.google.com/github/OLD/old-name/blob/main/lessons/"
             "01_vit_patching.ipynb) |")
    assert with_colab_links(badge, repository) == badge.replace("github/OLD/old-name/blob/main/",
                                                                "github/a-fork/vlm-course/blob/main/")


def test_a_fork_sets_its_url_and_the_sync_writes_it_everywhere(tmp_path, capsys):
    solutions, lessons = tmp_path / "solutions", tmp_path / "lessons"
    solutions.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Lesson 01"),
                                         nbformat.v4.new_code_cell(INSTALL_CELL)])
    nbformat.write(nb, solutions / "01_x.ipynb")
    readme = tmp_path / "README.md"
    readme.write_text("[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
                      "(https://colab.research.google.com/github/YOUR-ORG/build-a-vlm-course/blob/main/lessons/"
                      "01_x.ipynb)\n", encoding="utf-8")
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(f'[tool.vlm_course]\nrepository = "{FORK}"\nbranch = "main"\n', encoding="utf-8")
    paths = ["--solutions", str(solutions), "--lessons", str(lessons), "--readme", str(readme),
             "--pyproject", str(pyproject)]

    assert main(["clean", "--check", *paths]) == 1
    assert main(["--check", *paths]) == 1
    assert "COURSE_REPO_URL other than https://github.com/a-fork/vlm-course.git" in capsys.readouterr().err
    assert main(["clean", *paths]) == 0
    assert main(paths) == 0
    assert main(["clean", "--check", *paths]) == 0
    assert main(["--check", *paths]) == 0

    for path in (solutions / "01_x.ipynb", lessons / "01_x.ipynb"):
        code = nbformat.read(path, as_version=4).cells[1].source
        assert f'COURSE_REPO_URL = "{FORK}.git"' in code and "SOMEONE" not in code
    assert "https://colab.research.google.com/github/a-fork/vlm-course/blob/main/lessons/01_x.ipynb" in \
        readme.read_text(encoding="utf-8")
