"""The lessons' pictures.

Architecture figures are drawn by docs/figures/make_figures.py, stored as docs/figures/*.png and shown in markdown
cells as attachments. The stored PNGs are what the script draws, byte for byte, and every attachment in solutions/
and lessons/ is one of them, byte for byte: a figure cannot drift from its script, nor a lesson from its solution.
Code cells that plot keep their figure in solutions/ (a small palette PNG, written by `sync clean`); lessons/ keeps
no output at all.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

from vlm_course.grading.sync import (
    MAX_KEPT_PNG_BYTES,
    PNG_COLOURS,
    clean_solution,
    lesson_from_solution,
    small_png,
)

REPO = Path(__file__).resolve().parent.parent
FIGURES_DIR = REPO / "docs" / "figures"
# Lessons whose plotting cells all keep their figure in solutions/ (widgets, which need a live kernel, draw nothing).
LESSONS_WITH_FIGURE_OUTPUTS = ("00", "01", "02", "03", "04", "05", "06", "07", "08")
PLOTTING_CELL = re.compile(r"^(?!#).*\b(viz\.(plot_|show_)\w+|error_gallery)\(", re.M)


def _script():
    spec = importlib.util.spec_from_file_location("make_figures", FIGURES_DIR / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT = _script()


def _notebooks(folder: str) -> list[Path]:
    return sorted((REPO / folder).glob("[0-9][0-9]_*.ipynb"))


def _png_b64(array: np.ndarray, mode: str = "RGBA") -> str:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _plot_like(width: int = 400, height: int = 240) -> np.ndarray:
    """An RGBA picture with a few flat colours and smooth (antialiased-looking) edges: thousands of distinct colours."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgba = np.full((height, width, 4), 255, dtype=np.uint8)
    for k, colour in enumerate([(76, 114, 176), (221, 132, 82), (85, 168, 104)]):
        distance = np.abs(yy - (60 + 60 * k + 25 * np.sin(xx / (30 + 7 * k))))
        alpha = np.clip(4.0 - distance, 0, 1)[..., None]  # a 4 px line with soft edges
        rgba[..., :3] = (rgba[..., :3] * (1 - alpha) + np.array(colour) * alpha).astype(np.uint8)
    return rgba


# ----------------------------------------------------------------------------------------------
# Architecture figures: script, PNG files, attachments


@pytest.mark.parametrize("name", sorted(SCRIPT.FIGURES))
def test_the_script_draws_each_stored_png_byte_for_byte(name):
    stored = FIGURES_DIR / name
    assert stored.exists(), f"run: python docs/figures/make_figures.py --embed ({name} is missing)"
    assert stored.read_bytes() == SCRIPT.render(name), f"run: python docs/figures/make_figures.py --embed ({name})"


def test_every_stored_png_comes_from_the_script():
    assert {p.name for p in FIGURES_DIR.glob("*.png")} == set(SCRIPT.FIGURES)


def test_figures_are_small_palette_pngs():
    for name in SCRIPT.FIGURES:
        png = (FIGURES_DIR / name).read_bytes()
        image = Image.open(io.BytesIO(png))
        assert image.mode == "P" and len(image.getcolors()) <= SCRIPT.COLOURS, name
        assert image.width <= 1100 and len(png) <= 40_000, f"{name}: {image.size}, {len(png)} bytes"
        assert not image.info.keys() - {"transparency"}, f"{name} carries metadata {image.info}"


@pytest.mark.parametrize("folder", ["solutions", "lessons"])
def test_attachments_are_the_scripts_figures_byte_for_byte(folder):
    shown = 0
    for path in _notebooks(folder):
        for cell in nbformat.read(path, as_version=4).cells:
            refs = set(SCRIPT.ATTACHMENT.findall(cell.source)) if cell.cell_type == "markdown" else set()
            attachments = cell.get("attachments") or {}
            where = f"{path.name} cell {cell.get('id')}"
            assert set(attachments) == refs, f"{where}: shows {sorted(refs)} but attaches {sorted(attachments)}"
            for name, data in attachments.items():
                assert set(data) == {"image/png"}, where
                assert base64.b64decode(data["image/png"]) == (FIGURES_DIR / name).read_bytes(), \
                    f"{where}: {name} differs from docs/figures/{name}: run python docs/figures/make_figures.py --embed"
                shown += 1
    assert shown, f"no figure shown in {folder}/"


def test_every_lesson_shows_figures_and_every_figure_is_shown():
    shown: dict[str, set[str]] = {}
    for path in _notebooks("solutions"):
        cells = nbformat.read(path, as_version=4).cells
        shown[path.name[:2]] = {n for c in cells if c.cell_type == "markdown" for n in SCRIPT.ATTACHMENT.findall(c.source)}
    assert {f"{n:02d}" for n in range(8)} <= set(shown)  # lessons 00-07, and any added after them
    assert all(shown.values()), f"lessons without a figure: {[k for k, v in shown.items() if not v]}"
    assert set().union(*shown.values()) == set(SCRIPT.FIGURES), "a figure no lesson shows"


def test_check_mode_sees_a_stale_attachment(tmp_path, monkeypatch):
    """make_figures --check fails when an attachment differs from the script's figure (and changes nothing)."""
    solutions = tmp_path / "solutions"
    solutions.mkdir()
    name = sorted(SCRIPT.FIGURES)[0]
    cell = nbformat.v4.new_markdown_cell(f"A figure:\n\n![it](attachment:{name})")
    cell["attachments"] = {name: {"image/png": _png_b64(_plot_like(8, 8))}}
    nb = nbformat.v4.new_notebook(cells=[cell])
    nbformat.write(nb, solutions / "01_demo.ipynb")
    monkeypatch.setattr(SCRIPT, "REPO", tmp_path)
    before = (solutions / "01_demo.ipynb").read_text()
    assert SCRIPT.embed({name: SCRIPT.render(name)}, check=True) == ["01_demo.ipynb"]
    assert (solutions / "01_demo.ipynb").read_text() == before
    SCRIPT.embed({name: SCRIPT.render(name)}, check=False)
    fixed = nbformat.read(solutions / "01_demo.ipynb", as_version=4).cells[0]
    assert base64.b64decode(fixed.attachments[name]["image/png"]) == SCRIPT.render(name)
    assert SCRIPT.embed({name: SCRIPT.render(name)}, check=True) == []


# ----------------------------------------------------------------------------------------------
# Figures drawn by code cells: kept in solutions, small; none in lessons


def _plotted_notebook(tmp_path: Path, *pngs: str, kind: str = "display_data") -> Path:
    cell = nbformat.v4.new_code_cell("viz.plot_something()", execution_count=3)
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="drawn\n")]
    cell.outputs += [nbformat.v4.new_output(kind, data={"image/png": png, "text/plain": "<Figure>"},
                                            metadata={"image/png": {"width": 400}}) for png in pngs]
    if kind == "execute_result":
        for output in cell.outputs[1:]:
            output.execution_count = 3
    path = tmp_path / "solutions" / "01_demo.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), path)
    return path


@pytest.mark.parametrize("kind", ["display_data", "execute_result"])
def test_clean_keeps_a_figure_as_a_small_palette_png_that_looks_the_same(tmp_path, kind):
    original = _plot_like()
    path = _plotted_notebook(tmp_path, _png_b64(original), kind=kind)
    cell = nbformat.reads(clean_solution(path), as_version=4).cells[0]
    assert [o.output_type for o in cell.outputs] == ["stream", kind] and cell.execution_count == 1
    figure = cell.outputs[1]
    assert figure.get("execution_count") is None, "no counts stored on outputs"
    assert set(figure.data) == {"image/png", "text/plain"} and figure.metadata == {}
    png = base64.b64decode(figure.data["image/png"])
    image = Image.open(io.BytesIO(png))
    assert image.mode == "P" and len(image.getcolors()) <= PNG_COLOURS
    assert len(png) < len(base64.b64decode(_png_b64(original)))
    error = np.abs(np.asarray(image.convert("RGB"), dtype=float) - original[..., :3]).mean()
    assert error < 1.0, f"the palette changed the picture by {error:.2f} levels per pixel on average"
    path.write_text(clean_solution(path))
    assert clean_solution(path) == path.read_text(), "clean is idempotent on figures"
    lesson = nbformat.reads(lesson_from_solution(path), as_version=4).cells[0]
    assert lesson.outputs == [] and lesson.execution_count is None


def test_clean_flattens_transparency_onto_white(tmp_path):
    transparent = np.zeros((20, 30, 4), dtype=np.uint8)  # fully transparent black
    png = small_png(_png_b64(transparent))
    assert np.asarray(Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB")).min() == 255


def test_clean_drops_unreadable_and_oversized_figures(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)  # no palette makes it small
    assert small_png(_png_b64(noise, "RGB")) is None
    assert small_png("iVBORw0KGgo=") is None  # a PNG signature and nothing else
    assert small_png("not base64 at all!") is None
    path = _plotted_notebook(tmp_path, "iVBORw0KGgo=", _png_b64(noise, "RGB"))
    cell = nbformat.reads(clean_solution(path), as_version=4).cells[0]
    assert [o.output_type for o in cell.outputs] == ["stream"]


@pytest.mark.parametrize("path", _notebooks("solutions"), ids=lambda p: p.name)
def test_solution_figures_are_small_palette_pngs(path):
    for cell in nbformat.read(path, as_version=4).cells:
        for output in cell.get("outputs", []):
            if "image/png" in output.get("data", {}):
                png = base64.b64decode(output.data["image/png"])
                assert len(png) <= MAX_KEPT_PNG_BYTES and Image.open(io.BytesIO(png)).mode == "P", cell.id


@pytest.mark.parametrize("lesson", LESSONS_WITH_FIGURE_OUTPUTS)
def test_solution_plotting_cells_keep_their_figure(lesson):
    path = next((REPO / "solutions").glob(f"{lesson}_*.ipynb"))
    cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code" and PLOTTING_CELL.search(c.source)]
    assert cells, f"{path.name} has no plotting cell"
    for cell in cells:
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), f"{path.name} cell {cell.id} lost its figure"


@pytest.mark.parametrize("path", _notebooks("lessons"), ids=lambda p: p.name)
def test_lessons_keep_no_outputs(path):
    for cell in nbformat.read(path, as_version=4).cells:
        assert not cell.get("outputs"), f"{path.name} cell {cell.id}"
