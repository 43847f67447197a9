"""Generate the student notebooks (lessons/) from the solution notebooks (solutions/), and keep both clean.

    python -m vlm_course.grading.sync            write lessons/NN_*.ipynb from solutions/NN_*.ipynb
    python -m vlm_course.grading.sync --check    exit 1 and name the files when lessons/ is out of date
    python -m vlm_course.grading.sync clean      strip execution counts, noisy metadata and big outputs
                                                 from solutions/ (small text outputs and figures stay, for
                                                 nbval and readers; such cells keep a stable count, nbval
                                                 needs one; figures are stored as small palette PNGs)
    python -m vlm_course.grading.sync clean --check
    python -m vlm_course.grading.sync clean --execute [NAMES]
                                                 re-run solutions in the `tiny` profile, offline, then clean

In a solution notebook, an exercise's body sits between marker lines:

    def patchify(images, patch_size):
        \"\"\"(B, C, H, W) -> (B, N, C*p*p) ...\"\"\"
        ### BEGIN SOLUTION
        ### HINT: view as (B, C, H/p, p, W/p, p) and permute the grid axes to the front
        b, c, h, w = images.shape
        ...
        ### END SOLUTION

and the lesson gets, at the same indentation:

        # Hint: view as (B, C, H/p, p, W/p, p) and permute the grid axes to the front
        raise NotImplementedError("patchify is not implemented yet")

The course's repository is one setting, `repository` (and `branch`) in pyproject.toml's [tool.vlm_course]
table. Both commands write it where it is used: `clean` and the lesson generation into every notebook's
Colab install cell (the `COURSE_REPO_URL = ...` line), the lesson generation into the README's "Open in
Colab" badges. A fork sets its own URL there, then runs `sync clean` and `sync`; `--check` names every file
that still holds another URL.

Output is deterministic (same input, same bytes): cell ids are kept, JSON is written by nbformat with
sorted keys, and nothing that depends on the machine or the time is kept.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import copy
import hashlib
import io
import os
import re
import sys
from pathlib import Path

import nbformat

BEGIN, END, HINT = "### BEGIN SOLUTION", "### END SOLUTION", "### HINT:"
CHECK_OUTPUT = "# NBVAL_CHECK_OUTPUT"
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
KEPT_CELL_METADATA = ("tags",)
MAX_KEPT_OUTPUT_CHARS = 2000  # clean: text outputs up to this size stay in solutions (nbval, readers)
MAX_KEPT_PNG_BYTES = 60_000  # clean: a figure stays if its PNG, once reduced to a palette, is at most this big
PNG_COLOURS = 256  # the palette figures are reduced to (plots and diagrams need far fewer)
_DEF = re.compile(r"^(\s*)(?:async\s+def|def|class)\s+(\w+)")
_CELL_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# The Colab install cell's URL line, and the README's Colab links (one per lesson).
_REPO_URL_LINE = re.compile(r'^(?P<indent>[ \t]*)COURSE_REPO_URL[ \t]*=[ \t]*"[^"\n]*"[^\n]*$', re.M)
REPO_URL_COMMENT = "# the course's repository: [tool.vlm_course] in pyproject.toml"
_COLAB_LINK = re.compile(r"https://colab\.research\.google\.com/github/[^/\s)]+/[^/\s)]+/blob/[^/\s)]+/")
_GITHUB_REPO = re.compile(r"^https://github\.com/(?P<owner>[A-Za-z0-9_.-]+)/(?P<name>[A-Za-z0-9_.-]+?)(?:\.git)?/?$")


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------
# The course's repository: one setting, written into the install cells and the README badges


class CourseRepository:
    """The published repository of the course, from pyproject.toml's [tool.vlm_course] table."""

    def __init__(self, url: str, branch: str = "main"):
        match = _GITHUB_REPO.match(url.strip())
        if not match:
            raise ValueError(f"[tool.vlm_course] repository must be a GitHub URL like "
                             f"https://github.com/OWNER/NAME (Colab opens notebooks from GitHub), got {url!r}")
        if not re.fullmatch(r"[A-Za-z0-9_./-]+", branch):
            raise ValueError(f"[tool.vlm_course] branch must be a branch name, got {branch!r}")
        self.owner, self.name, self.branch = match["owner"], match["name"], branch

    @property
    def clone_url(self) -> str:
        return f"https://github.com/{self.owner}/{self.name}.git"

    @property
    def colab_prefix(self) -> str:
        """The start of every notebook's Colab link; the notebook's path in the repository follows."""
        return f"https://colab.research.google.com/github/{self.owner}/{self.name}/blob/{self.branch}/"

    def __repr__(self) -> str:
        return f"CourseRepository({self.clone_url!r}, branch={self.branch!r})"


def course_repository(pyproject: Path | None = None) -> CourseRepository:
    """The repository set in pyproject.toml ([tool.vlm_course] repository and branch)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = pyproject or repo_root() / "pyproject.toml"
    settings = tomllib.loads(path.read_text(encoding="utf-8")).get("tool", {}).get("vlm_course", {})
    if "repository" not in settings:
        raise KeyError(f"{path} has no [tool.vlm_course] repository = \"https://github.com/OWNER/NAME\"")
    return CourseRepository(settings["repository"], settings.get("branch", "main"))


def with_repository_url(source: str, repository: CourseRepository) -> str:
    """A code cell's source with its `COURSE_REPO_URL = "..."` line (if any) pointing at `repository`."""
    return _REPO_URL_LINE.sub(
        lambda m: f'{m["indent"]}COURSE_REPO_URL = "{repository.clone_url}"  {REPO_URL_COMMENT}', source)


def with_colab_links(text: str, repository: CourseRepository) -> str:
    """Markdown (the README) with every Colab link opening the notebook from `repository`."""
    return _COLAB_LINK.sub(repository.colab_prefix, text)


def sync_readme(readme: Path, repository: CourseRepository, check: bool) -> int:
    """Write (or, with check, compare) the README's Colab badges. Returns the exit status."""
    if not readme.exists():
        return 0
    current = readme.read_text(encoding="utf-8")
    text = with_colab_links(current, repository)
    if text == current:
        return 0
    if check:
        print(f"out of sync: {_rel(readme)} (its Colab links are not {repository.colab_prefix}...)", file=sys.stderr)
        print("run: python -m vlm_course.grading.sync", file=sys.stderr)
        return 1
    readme.write_text(text, encoding="utf-8")
    print(f"wrote the Colab links of {_rel(readme)}")
    return 0


# ----------------------------------------------------------------------------------------------
# Stubbing solution regions


def stub_source(source: str, where: str = "cell") -> str:
    """Replace every BEGIN/END SOLUTION region of one cell's source with a hint comment and a stub."""
    lines = source.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != BEGIN:
            if lines[i].strip() == END:
                raise ValueError(f"{where}: '{END}' without a matching '{BEGIN}'")
            out.append(lines[i])
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() in (BEGIN, END)), None)
        if end is None or lines[end].strip() != END:
            raise ValueError(f"{where}: '{BEGIN}' on line {i + 1} has no matching '{END}'")
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        hints = [line.strip()[len(HINT):].strip() for line in lines[i + 1:end] if line.strip().startswith(HINT)]
        out.extend(f"{indent}# Hint: {hint}" for hint in hints)
        out.append(f'{indent}raise NotImplementedError("{enclosing_name(lines[:i], indent)} is not implemented yet")')
        i = end + 1
    return "\n".join(out)


def enclosing_name(lines_above: list[str], indent: str) -> str:
    """The def/class a region sits in, as 'ViTBlock.forward' for methods; 'this exercise' at top level."""
    names, level = [], len(indent)
    for line in reversed(lines_above):
        match = _DEF.match(line)
        if match and len(match.group(1)) < level:
            names.append(match.group(2))
            level = len(match.group(1))
    return ".".join(reversed(names)) or "this exercise"


# ----------------------------------------------------------------------------------------------
# Normalising notebooks


def normalise(nb, keep_outputs: bool, repository: CourseRepository | None = None) -> nbformat.NotebookNode:
    """A copy with minimal metadata, stable cell ids, and either no outputs or small text outputs only.

    Execution counts are cleared, except on cells that keep outputs (see below): those get their ordinal.
    The install cell's COURSE_REPO_URL is `repository`'s (default: the one set in pyproject.toml).
    """
    repository = repository or course_repository()
    nb = copy.deepcopy(nb)
    nb.nbformat, nb.nbformat_minor = 4, 5
    nb.metadata = nbformat.from_dict({"kernelspec": KERNELSPEC, "language_info": {"name": "python"}})
    seen: set[str] = set()
    code_cells = 0
    for index, cell in enumerate(nb.cells):
        cell.metadata = nbformat.from_dict({k: cell.metadata[k] for k in KEPT_CELL_METADATA if k in cell.metadata})
        cell_id = cell.get("id")
        if not cell_id or not _CELL_ID.match(cell_id) or cell_id in seen:
            cell_id = hashlib.sha1(f"{index}:{cell.source}".encode()).hexdigest()[:12]
        cell.id = cell_id
        seen.add(cell_id)
        if cell.cell_type == "code":
            code_cells += 1
            cell.source = with_repository_url(cell.source, repository)
            cell.outputs = small_outputs(cell) if keep_outputs else []
            # nbval refuses stored outputs on a cell with no execution count ("unrun reference cell"), so a
            # cell that keeps outputs gets a stable count: its number among the code cells.
            cell.execution_count = code_cells if cell.outputs else None
        else:
            cell.pop("outputs", None)
            cell.pop("execution_count", None)
    return nb


def small_outputs(cell) -> list:
    """Outputs worth keeping in a solution: stdout, plain-text results and figures, small, without counts.

    HTML, widgets, stderr (warnings with local paths) and errors are dropped: they are large, differ between
    machines, or both. Text longer than MAX_KEPT_OUTPUT_CHARS is dropped, except in cells marked
    NBVAL_CHECK_OUTPUT, whose text nbval compares. A figure (a PNG displayed or returned) is kept as a palette PNG (see
    `small_png`) with its text/plain stand-in, or dropped if it is still bigger than MAX_KEPT_PNG_BYTES.
    """
    checked = CHECK_OUTPUT in cell.source
    kept = []
    for output in cell.get("outputs", []):
        if output.output_type in ("display_data", "execute_result") and "image/png" in output.data:
            png = small_png(output.data["image/png"])
            if png is not None:
                data = {"image/png": png, "text/plain": output.data.get("text/plain", "<Figure>")}
                kept.append(nbformat.v4.new_output(output.output_type, data=data))
                if output.output_type == "execute_result":
                    kept[-1].execution_count = None
            continue
        if output.output_type == "stream" and output.name == "stdout":
            text = output.text
            new = nbformat.v4.new_output("stream", name="stdout", text=text)
        elif output.output_type == "execute_result" and "text/plain" in output.data and len(output.data) == 1:
            text = output.data["text/plain"]
            new = nbformat.v4.new_output("execute_result", data={"text/plain": text})
            new.execution_count = None
        else:
            continue
        if not (checked or len(text) <= MAX_KEPT_OUTPUT_CHARS):
            continue
        if kept and new.output_type == "stream" and kept[-1].output_type == "stream":
            kept[-1].text += text  # a kernel sends one print in several chunks: store them as one
        else:
            kept.append(new)
    return kept


def small_png(data: str) -> str | None:
    """A base64 PNG as a palette PNG of at most PNG_COLOURS colours (base64), or None if it is not a readable
    PNG or still bigger than MAX_KEPT_PNG_BYTES.

    Plots have few colours, so the palette costs nothing visible and divides the size by 2 to 4. A PNG that
    already has a palette is kept byte for byte, so that `clean` is idempotent.
    """
    from PIL import Image

    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (binascii.Error, ValueError, OSError):
        return None
    if image.format != "PNG":
        return None
    if image.mode != "P":
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat.alpha_composite(rgba)  # figures are drawn on white; transparency would cost palette entries
        buffer = io.BytesIO()
        flat.convert("RGB").quantize(PNG_COLOURS, dither=Image.Dither.NONE).save(buffer, "PNG", optimize=True)
        raw = buffer.getvalue()
    if len(raw) > MAX_KEPT_PNG_BYTES:
        return None
    return base64.b64encode(raw).decode("ascii")


def dumps(nb) -> str:
    text = nbformat.writes(nb, version=4)
    return text if text.endswith("\n") else text + "\n"


def lesson_from_solution(solution_path: Path, repository: CourseRepository | None = None) -> str:
    """The lesson notebook's text for one solution notebook."""
    nb = nbformat.read(solution_path, as_version=4)
    nb = normalise(nb, keep_outputs=False, repository=repository)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            cell.source = stub_source(cell.source, where=f"{solution_path.name} cell {index}")
    return dumps(nb)


def clean_solution(solution_path: Path, repository: CourseRepository | None = None) -> str:
    nb = nbformat.read(solution_path, as_version=4)
    return dumps(normalise(nb, keep_outputs=True, repository=repository))


# ----------------------------------------------------------------------------------------------
# Commands


def solution_notebooks(solutions: Path, names: list[str] | None = None) -> list[Path]:
    paths = sorted(solutions.glob(NOTEBOOK_GLOB))
    if names:
        paths = [p for p in paths if any(n in p.name for n in names)]
    return paths


def sync_lessons(solutions: Path, lessons: Path, check: bool, names: list[str] | None = None,
                 repository: CourseRepository | None = None) -> int:
    """Write (or, with check, compare) lessons/ against solutions/. Returns the exit status."""
    repository = repository or course_repository()
    stale = []
    paths = solution_notebooks(solutions, names)
    for solution in paths:
        target = lessons / solution.name
        text = lesson_from_solution(solution, repository)
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current == text:
            continue
        stale.append(target)
        if not check:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
            print(f"wrote {_rel(target)}")
    orphans = [] if names else sorted(p for p in lessons.glob(NOTEBOOK_GLOB) if not (solutions / p.name).exists())
    for orphan in orphans:
        print(f"{_rel(orphan)} has no solution notebook {_rel(solutions / orphan.name)}: delete it or add the solution",
              file=sys.stderr)
    if check and stale:
        for target in stale:
            print(f"out of sync: {_rel(target)} (solution changed, or the lesson was edited by hand)", file=sys.stderr)
        print("run: python -m vlm_course.grading.sync", file=sys.stderr)
    if check and (stale or orphans):
        return 1
    if check:
        print(f"lessons/ is in sync with solutions/ ({len(paths)} notebooks)")
    return 0


def clean_solutions(solutions: Path, check: bool, names: list[str] | None = None,
                    repository: CourseRepository | None = None) -> int:
    repository = repository or course_repository()
    dirty = []
    for solution in solution_notebooks(solutions, names):
        text = clean_solution(solution, repository)
        if solution.read_text(encoding="utf-8") == text:
            continue
        dirty.append(solution)
        if not check:
            solution.write_text(text, encoding="utf-8")
            print(f"cleaned {_rel(solution)}")
    if check and dirty:
        for path in dirty:
            print(f"not clean: {_rel(path)} (execution counts, metadata, large outputs, unreduced figures or "
                  f"a COURSE_REPO_URL other than {repository.clone_url})",
                  file=sys.stderr)
        print("run: python -m vlm_course.grading.sync clean", file=sys.stderr)
        return 1
    return 0


def execute_solutions(solutions: Path, names: list[str] | None = None, timeout: int = 600) -> None:
    """Re-run solution notebooks in place, as CI does (profile tiny, offline), so stored outputs are fresh."""
    from nbclient import NotebookClient

    os.environ.setdefault("VLM_COURSE_PROFILE", "tiny")
    os.environ["HF_HUB_OFFLINE"] = os.environ["VLM_COURSE_OFFLINE"] = "1"
    for solution in solution_notebooks(solutions, names):
        print(f"executing {_rel(solution)} (profile {os.environ['VLM_COURSE_PROFILE']}) ...", flush=True)
        nb = nbformat.read(solution, as_version=4)
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(solution.parent)}}).execute()
        solution.write_text(dumps(nb), encoding="utf-8")


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_course.grading.sync", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("words", nargs="*", metavar="[clean] NAME",
                        help="'clean' to tidy solutions/ instead of generating lessons/; then optional names: only "
                             "notebooks whose file name contains one of them (e.g. 01)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file would change")
    parser.add_argument("--execute", action="store_true", help="clean: re-run the solutions first (profile tiny)")
    parser.add_argument("--solutions", type=Path, default=repo_root() / "solutions")
    parser.add_argument("--lessons", type=Path, default=repo_root() / "lessons")
    parser.add_argument("--readme", type=Path, default=repo_root() / "README.md",
                        help="the file whose Colab badges are written (lesson generation only)")
    parser.add_argument("--pyproject", type=Path, default=repo_root() / "pyproject.toml",
                        help="where [tool.vlm_course] sets the course's repository")
    args = parser.parse_intermixed_args(argv)
    repository = course_repository(args.pyproject)
    mode = args.words.pop(0) if args.words and args.words[0] in ("clean", "lessons") else "lessons"
    args.names = args.words
    if mode == "clean":
        if args.execute:
            execute_solutions(args.solutions, args.names)
        return clean_solutions(args.solutions, args.check, args.names, repository)
    if args.execute:
        parser.error("--execute goes with the clean mode")
    status = sync_lessons(args.solutions, args.lessons, args.check, args.names, repository)
    return max(status, sync_readme(args.readme, repository, args.check))


if __name__ == "__main__":
    sys.exit(main())
