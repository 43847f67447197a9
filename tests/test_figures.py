"""The lessons' pictures: code cells that plot keep their figure in solutions/ (a small palette PNG, written by
`sync clean`); lessons/ keeps no output at all."""

from __future__ import annotations

import base64
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
# Lessons whose solution notebook has been re-run since its plots are kept: each of its plotting cells has a figure.
LESSONS_WITH_FIGURE_OUTPUTS: tuple[str, ...] = ()
PLOTTING_CELL = re.compile(r"^(?!#).*\b(viz\.(plot_|show_)\w+|error_gallery)\(", re.M)


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
# Figures drawn by code cells: kept in solutions, small; none in lessons


def _plotted_notebook(tmp_path: Path, *pngs: str) -> Path:
    cell = nbformat.v4.new_code_cell("viz.plot_something()", execution_count=3)
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="drawn\n")]
    cell.outputs += [nbformat.v4.new_output("display_data", data={"image/png": png, "text/plain": "<Figure>"},
                                            metadata={"image/png": {"width": 400}}) for png in pngs]
    path = tmp_path / "solutions" / "01_demo.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), path)
    return path


def test_clean_keeps_a_figure_as_a_small_palette_png_that_looks_the_same(tmp_path):
    original = _plot_like()
    path = _plotted_notebook(tmp_path, _png_b64(original))
    cell = nbformat.reads(clean_solution(path), as_version=4).cells[0]
    assert [o.output_type for o in cell.outputs] == ["stream", "display_data"] and cell.execution_count == 1
    figure = cell.outputs[1]
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
