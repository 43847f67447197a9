"""Mini-cauldron: small synthetic vision-language data in the_cauldron's row schema.

Every row looks like a row of HuggingFaceM4/the_cauldron:

    {"images": [PIL.Image (RGB)],
     "texts": [{"user": "What colour is the triangle?", "assistant": "red", "source": "synthetic-shapes"},
               ...]}                     # several turns = a conversation about the same image

Seven subsets mimic the kinds of data a VLM is trained on:

    shapes     colour / shape questions          (clevr, vqav2)
    count      "How many squares are there?"     (tallyqa)
    spatial    yes/no spatial relations          (vsr)
    ocr        one rendered word                 (rendered_text)
    mc         lettered multiple choice          (ai2d, MMStar)
    grounding  boxes written as text, 0-1000     (Vary-toy)
    position   "top left" ... "bottom right"     (absolute position in a 3 x 3 grid)

Answers are short canonical strings (a lower-case word or two, a digit, a letter or a box) so that exact match
is a fair metric. Generation is deterministic: each (subset, seed) pair seeds its own numpy Generator,
nothing touches global random state, and the fonts come from installed packages (Pillow's default font
and matplotlib's DejaVu fonts), never from system paths that may be absent.

The committed parquet files under assets/mini_cauldron/ are rebuilt, byte for byte, with

    python -m vlm_course.data.synthetic --out assets/mini_cauldron

using SPLIT_SEEDS (train: seed 0, test: seed 1) and the sizes in TRAIN_SIZES / TEST_SIZE.

Why one file of ~700 lines: the subsets share one vocabulary, one renderer and one rng discipline (each subset
its own stream, drawn in a fixed order), and the committed files depend on all three staying exactly as they
are. Most of the length is the question phrasings and one short generator per subset, each read on its own;
the sections run vocabulary, drawing, fonts, subsets, generate, parquet, gallery, command line.
"""

from __future__ import annotations

import argparse
import io
import json
import textwrap
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

# -----------------------------------------------------------------------------
# vocabulary

# Six saturated colours far apart in hue, so they survive 64 px images, anti-aliasing and light noise.
PALETTE = {
    "red": (215, 35, 35),
    "green": (35, 155, 55),
    "blue": (35, 85, 225),
    "yellow": (240, 200, 15),
    "purple": (140, 55, 185),
    "orange": (250, 130, 15),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "diamond")
RELATIONS = ("left", "right", "above", "below")
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
MAX_COUNT = 5
# The cells of a 3 x 3 grid of equal cells, row by row (top, middle, bottom; left, middle, right).
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
# No object's centre lies closer than this (a fraction of the image side: 3 px at 64 px) to a cell boundary.
POSITION_MARGIN = 3 / 64

# ~100 common English words of 3-5 letters for the OCR subset.
WORDS = (
    "act add age air all and ant any apple arm art baby back bag ball band bank bear bed bell bird "
    "black blue boat body book box boy bread bus cake call car cat chair city clock cloud coat cold "
    "cup day desk dog door dream duck ear earth egg eye face farm fish flag food foot fork frog game "
    "girl glass goat gold green hand hat heart home horse house ice juice key king lamp leaf lemon "
    "light lion map milk moon mouse music net night nose ocean owl paper park pen pig plant queen rain "
    "red river road rock rose salt sea ship shoe sky snow star sun table tea tiger time tree water "
    "wind year zoo"
).split()

# New subsets go at the end: each subset has its own rng stream, so the others' rows stay unchanged.
SUBSETS = ("shapes", "count", "spatial", "ocr", "mc", "grounding", "position")

# Committed mini-cauldron: the train and held-out test splits come from different seeds.
SPLIT_SEEDS = {"train": 0, "test": 1}
TRAIN_SIZES = {"shapes": 2000, "count": 2000, "spatial": 2000, "mc": 2000, "ocr": 1000, "grounding": 1000,
               "position": 2000}
TEST_SIZE = 200

MC_INSTRUCTION = "Answer with the option's letter."
BOX_INSTRUCTION = "Answer with a box."
LETTERS = "ABCD"

# Several phrasings per question type, so a model cannot key on one exact sentence.
COLOUR_QUESTIONS = (
    "What colour is the {shape}?",
    "What is the colour of the {shape}?",
    "Which colour does the {shape} have?",
    "What color is the {shape}?",
    "Tell me the colour of the {shape}.",
)
SHAPE_QUESTIONS = (
    "What shape is the {colour} object?",
    "What is the shape of the {colour} object?",
    "Which shape is {colour}?",
    "What kind of shape is the {colour} one?",
)
COUNT_QUESTIONS = {
    "shape": ("How many {shape}s are there?", "How many {shape}s are in the image?",
              "Count the {shape}s.", "What is the number of {shape}s?"),
    "colour": ("How many {colour} objects are there?", "How many {colour} shapes can you see?",
               "Count the {colour} objects."),
    "total": ("How many objects are there?", "How many shapes are in the image?",
              "Count the objects in the image."),
}
RELATION_PHRASES = {
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
SPATIAL_QUESTIONS = (
    "Is the {a} {rel} the {b}?",
    "Is it true that the {a} is {rel} the {b}?",
    "Does the {a} appear {rel} the {b}?",
)
OCR_QUESTIONS = (
    "What word is written in the image?",
    "What does the text in the image say?",
    "Read the word in the image.",
    "What is written here?",
    "Which word is shown?",
)
GROUNDING_QUESTIONS = (
    "Where is the {ref}?",
    "Locate the {ref}.",
    "Find the {ref}.",
    "What is the position of the {ref}?",
)
POSITION_QUESTIONS = (
    "In which part of the image is the {ref}?",
    "Where in the image is the {ref}?",
    "Which part of the picture holds the {ref}?",
    "In what region of the image is the {ref}?",
    "Where is the {ref} located in the image?",
    "Which region of the image contains the {ref}?",
)

# -----------------------------------------------------------------------------
# drawing


@dataclass
class Shape:
    shape: str
    colour: str
    cx: float  # centre and side length, in pixels of the final image
    cy: float
    size: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        half = self.size / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)


SUPERSAMPLE = 4  # draw at 4x and downsample: smooth edges without blurring 64 px images


def _rng(subset: str, seed: int) -> np.random.Generator:
    # crc32 rather than hash(): Python salts str hashes per process, crc32 is stable.
    return np.random.default_rng([zlib.crc32(subset.encode()), seed])


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _background(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """A light, low-saturation background: plain, a gentle gradient, or plain with light noise."""

    def light_colour():
        return np.clip(rng.uniform(222, 250) + rng.uniform(-10, 10, size=3), 0, 255)

    style = rng.choice(3, p=[0.5, 0.3, 0.2])
    pixels = np.broadcast_to(light_colour(), (image_size, image_size, 3)).astype(np.float32)
    if style == 1:  # linear gradient between two light colours in a random direction
        angle = rng.uniform(0, 2 * np.pi)
        y, x = np.mgrid[0:image_size, 0:image_size] / max(image_size - 1, 1)
        t = x * np.cos(angle) + y * np.sin(angle)
        t = ((t - t.min()) / (t.max() - t.min()))[..., None]
        pixels = (1 - t) * pixels + t * light_colour()
    elif style == 2:
        pixels = pixels + rng.normal(0, 3.0, size=(image_size, image_size, 1))
    return pixels


def _polygon(shape: str, cx: float, cy: float, half: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "triangle":
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "diamond":
        return [(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(rng: np.random.Generator, image_size: int, shapes=(), text=None) -> Image.Image:
    """Draw shapes (and optionally a word: (text, font, xy, colour)) over a light background."""
    scale = SUPERSAMPLE
    layer = Image.new("RGBA", (image_size * scale, image_size * scale), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for s in shapes:
        fill = PALETTE[s.colour] + (255,)
        cx, cy, half = s.cx * scale, s.cy * scale, s.size * scale / 2
        if s.shape == "circle":
            draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
        else:
            draw.polygon(_polygon(s.shape, cx, cy, half), fill=fill)
    if text is not None:
        word, font, (x, y), colour = text
        draw.text((x * scale, y * scale), word, font=font, fill=colour + (255,))
    # Pillow resizes RGBA with premultiplied alpha, so the edges blend cleanly over the background.
    layer = layer.resize((image_size, image_size), Image.Resampling.BOX)
    background = Image.fromarray(np.clip(_background(rng, image_size), 0, 255).round().astype(np.uint8))
    return Image.alpha_composite(background.convert("RGBA"), layer).convert("RGB")


MIN_OBJECT_PX = 10  # smaller shapes stop being recognisable: a triangle of 6 px is a blob


def place(rng: np.random.Generator, specs, image_size: int, size_range, accept=None, gap: float = 2.0):
    """Random non-overlapping positions for (shape, colour) specs; `accept` can demand a layout."""
    lo, hi = (max(f * image_size, MIN_OBJECT_PX) for f in size_range)
    for _attempt in range(200):
        placed = _try_place(rng, specs, image_size, lo, hi, gap)
        if placed is None:  # crowded: shrink a little, but never below MIN_OBJECT_PX
            lo, hi = max(lo * 0.95, MIN_OBJECT_PX), max(hi * 0.95, MIN_OBJECT_PX)
        elif accept is None or accept(placed):
            return placed
    raise RuntimeError(f"could not place {len(specs)} shapes in a {image_size} px image; use a larger image_size")


def _try_place(rng, specs, image_size, lo, hi, gap):
    placed: list[Shape] = []
    for shape, colour in specs:
        size = rng.uniform(lo, hi)
        for _try in range(50):
            cx, cy = rng.uniform(size / 2 + 1, image_size - size / 2 - 1, size=2)
            candidate = Shape(shape, colour, float(cx), float(cy), float(size))
            if all(_apart(candidate, other, gap) for other in placed):
                placed.append(candidate)
                break
        else:
            return None
    return placed


def _apart(a: Shape, b: Shape, gap: float) -> bool:
    ax1, ay1, ax2, ay2 = a.box
    bx1, by1, bx2, by2 = b.box
    return ax2 + gap <= bx1 or bx2 + gap <= ax1 or ay2 + gap <= by1 or by2 + gap <= ay1


def holds(relation: str, a: Shape, b: Shape) -> bool:
    """True when `a` is clearly `relation` of `b`: apart along that axis, and mostly along it (< 34 degrees)."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    ax1, ay1, ax2, ay2 = a.box
    bx1, by1, bx2, by2 = b.box
    horizontal, vertical = abs(dx) > 1.5 * abs(dy), abs(dy) > 1.5 * abs(dx)
    if relation == "left":
        return ax2 <= bx1 and horizontal
    if relation == "right":
        return bx2 <= ax1 and horizontal
    if relation == "above":
        return ay2 <= by1 and vertical
    if relation == "below":
        return by2 <= ay1 and vertical
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


# -----------------------------------------------------------------------------
# fonts (OCR)


@lru_cache(maxsize=1)
def font_names() -> tuple[str, ...]:
    """Pillow's built-in font plus every DejaVu face shipped inside matplotlib's mpl-data."""
    names = ["pillow-default"]
    try:
        import matplotlib

        ttf_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
        # DejaVu*Display fonts hold only a few glyphs: leave them out.
        names += sorted(str(p) for p in ttf_dir.glob("DejaVu*.ttf") if "Display" not in p.name)
    except ImportError:
        pass
    return tuple(names)


@lru_cache(maxsize=512)
def load_font(name: str, size: int) -> ImageFont.FreeTypeFont:
    if name == "pillow-default":
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(name, size)


# -----------------------------------------------------------------------------
# one generator per subset: each returns (image, [(question, answer), ...])


def _distinct_specs(rng: np.random.Generator, k: int) -> list[tuple[str, str]]:
    """k objects with pairwise different shapes AND colours, so 'the red object' or 'the square' is unique."""
    shapes = rng.choice(SHAPES, size=k, replace=False)
    colours = rng.choice(COLOURS, size=k, replace=False)
    return [(str(s), str(c)) for s, c in zip(shapes, colours)]


def _describe(rng: np.random.Generator, s: Shape) -> str:
    """Refer to an object by colour and shape, or by one of them (unique in scenes of distinct objects)."""
    return _pick(rng, (f"{s.colour} {s.shape}", f"{s.colour} {s.shape}", s.shape, f"{s.colour} object"))


def _attribute_question(rng: np.random.Generator, s: Shape, ask: str) -> tuple[str, str]:
    if ask == "colour":
        return _pick(rng, COLOUR_QUESTIONS).format(shape=s.shape), s.colour
    return _pick(rng, SHAPE_QUESTIONS).format(colour=s.colour), s.shape


def _shapes(rng, image_size, i, state):
    shapes = place(rng, _distinct_specs(rng, int(rng.integers(1, 4))), image_size, (0.22, 0.36))
    questions = [(obj, ask) for obj in shapes for ask in ("colour", "shape")]
    order = rng.permutation(len(questions))
    turns = 2 if rng.random() < 0.3 else 1  # some rows are two-turn conversations about one image
    qa = [_attribute_question(rng, *questions[j]) for j in order[:turns]]
    return render(rng, image_size, shapes), qa


def count_scene(rng, image_size, answer):
    """A scene where the answer to a random counting question is `answer` (1..MAX_COUNT)."""
    kind = _pick(rng, ("shape", "shape", "colour", "total"))
    n_distractors = int(rng.integers(0, MAX_COUNT - answer + 1)) if kind != "total" else 0
    if kind == "shape":
        target = _pick(rng, SHAPES)
        others = [s for s in SHAPES if s != target]
        specs = [(target, _pick(rng, COLOURS)) for _ in range(answer)]
        specs += [(_pick(rng, others), _pick(rng, COLOURS)) for _ in range(n_distractors)]
        question = _pick(rng, COUNT_QUESTIONS["shape"]).format(shape=target)
    elif kind == "colour":
        target = _pick(rng, COLOURS)
        others = [c for c in COLOURS if c != target]
        specs = [(_pick(rng, SHAPES), target) for _ in range(answer)]
        specs += [(_pick(rng, SHAPES), _pick(rng, others)) for _ in range(n_distractors)]
        question = _pick(rng, COUNT_QUESTIONS["colour"]).format(colour=target)
    else:
        specs = [(_pick(rng, SHAPES), _pick(rng, COLOURS)) for _ in range(answer)]
        question = _pick(rng, COUNT_QUESTIONS["total"])
    specs = [specs[j] for j in rng.permutation(len(specs))]
    shapes = place(rng, specs, image_size, (0.17, 0.25), gap=3.0)
    return shapes, question


def _count(rng, image_size, i, state):
    answer = _balanced(rng, state, "count", range(1, MAX_COUNT + 1), i)
    shapes, question = count_scene(rng, image_size, answer)
    return render(rng, image_size, shapes), [(question, str(answer))]


def _spatial_question(rng, a, b, relation):
    rel = _pick(rng, RELATION_PHRASES[relation])
    return _pick(rng, SPATIAL_QUESTIONS).format(a=_describe(rng, a), rel=rel, b=_describe(rng, b))


def _spatial(rng, image_size, i, state):
    answer = _balanced(rng, state, "yes/no", ("yes", "no"), i)
    relation = _pick(rng, RELATIONS)
    # A "no" scene has the opposite relation, so the question is never borderline.
    truth = relation if answer == "yes" else OPPOSITE[relation]
    n = 2 if rng.random() < 0.7 else 3  # sometimes a third, unrelated object
    shapes = place(rng, _distinct_specs(rng, n), image_size, (0.2, 0.3), accept=lambda s: holds(truth, s[0], s[1]))
    a, b = shapes[0], shapes[1]
    qa = [(_spatial_question(rng, a, b, relation), answer)]
    if rng.random() < 0.25:  # follow-up with the roles swapped: the answer flips
        qa.append((_spatial_question(rng, b, a, relation), "no" if answer == "yes" else "yes"))
    return render(rng, image_size, shapes), qa


TEXT_COLOURS = ((20, 20, 20), (30, 40, 120), (120, 25, 25), (20, 90, 40), (90, 30, 110))


def _ocr(rng, image_size, i, state):
    word = _pick(rng, WORDS)
    font_name = _pick(rng, font_names())
    margin = 0.06 * image_size
    # Largest font size (in supersampled pixels) that fits the word, then a random size near it.
    probe = load_font(font_name, 100)
    left, top, right, bottom = probe.getbbox(word)
    fit = min((image_size - 2 * margin) / (right - left), 0.5 * image_size / (bottom - top)) * 100
    size = int(rng.uniform(0.75, 1.0) * fit * SUPERSAMPLE)
    font = load_font(font_name, size)
    left, top, right, bottom = (v / SUPERSAMPLE for v in font.getbbox(word))
    x = rng.uniform(margin, max(margin, image_size - margin - (right - left))) - left
    y = rng.uniform(margin, max(margin, image_size - margin - (bottom - top))) - top
    image = render(rng, image_size, text=(word, font, (x, y), _pick(rng, TEXT_COLOURS)))
    return image, [(_pick(rng, OCR_QUESTIONS), word)]


def _mc(rng, image_size, i, state):
    letter = _balanced(rng, state, "letter", LETTERS, i)
    kind = _pick(rng, ("colour", "shape", "count"))
    if kind == "count":
        answer = int(rng.integers(1, MAX_COUNT + 1))
        shapes, question = count_scene(rng, image_size, answer)
        answer, pool = str(answer), [str(k) for k in range(1, MAX_COUNT + 1)]
    else:
        shapes = place(rng, _distinct_specs(rng, int(rng.integers(1, 4))), image_size, (0.22, 0.36))
        question, answer = _attribute_question(rng, _pick(rng, shapes), kind)
        pool = list(COLOURS if kind == "colour" else SHAPES)
    question = with_options(rng, question, answer, pool, letter)  # before render: keeps the rng's order
    return render(rng, image_size, shapes), [(question, letter)]


def with_options(rng: np.random.Generator, question: str, answer: str, pool, letter: str) -> str:
    """The question with four lettered options: the answer under `letter`, three random others from `pool`."""
    distractors = [pool[j] for j in rng.permutation(len(pool)) if pool[j] != answer][: len(LETTERS) - 1]
    options = distractors[:]
    options.insert(LETTERS.index(letter), answer)
    lines = [question, "Options:"] + [f"{L}. {o}" for L, o in zip(LETTERS, options)] + [MC_INSTRUCTION]
    return "\n".join(lines)


def box_text(shape: Shape, image_size: int) -> str:
    """Vary-toy style box: [x1, y1, x2, y2], integer coordinates normalised to 0-1000."""
    coords = (min(1000, max(0, round(v * 1000 / image_size))) for v in shape.box)
    return "[" + ", ".join(str(c) for c in coords) + "]"


def _grounding(rng, image_size, i, state):
    shapes = place(rng, _distinct_specs(rng, int(rng.integers(1, 4))), image_size, (0.2, 0.34))
    target = _pick(rng, shapes)
    question = _pick(rng, GROUNDING_QUESTIONS).format(ref=_describe(rng, target)) + " " + BOX_INSTRUCTION
    return render(rng, image_size, shapes), [(question, box_text(target, image_size))]


def position_of(cx: float, cy: float, image_size: int) -> str:
    """The POSITIONS word of the grid cell holding the point (cx, cy), in pixels of an image_size image."""
    col, row = (min(max(int(3 * v / image_size), 0), 2) for v in (cx, cy))
    return POSITIONS[3 * row + col]


def _clear_of_boundaries(v: float, image_size: int) -> bool:
    margin = POSITION_MARGIN * image_size
    return all(abs(v - line) >= margin for line in (image_size / 3, 2 * image_size / 3))


def _position_layout_ok(shapes, image_size: int) -> bool:
    """Every centre clear of the cell boundaries, and at most one object per cell."""
    cells = [position_of(s.cx, s.cy, image_size) for s in shapes]
    clear = all(_clear_of_boundaries(s.cx, image_size) and _clear_of_boundaries(s.cy, image_size) for s in shapes)
    return clear and len(set(cells)) == len(cells)


POSITION_SIZES = (0.2, 0.3)  # object side as a fraction of the image side, as in the spatial subset


def _in_cell(rng, spec, cell: int, size: float, image_size: int) -> Shape:
    """An object of side `size` whose centre lies in grid cell `cell` (an index into POSITIONS), clear of the
    cell's boundaries and with the whole object inside the image."""
    margin = POSITION_MARGIN * image_size
    centre = []
    for k in reversed(divmod(cell, 3)):  # column, then row
        low = max(k * image_size / 3 + margin, size / 2 + 1)
        high = min((k + 1) * image_size / 3 - margin, image_size - size / 2 - 1)
        centre.append(float(rng.uniform(low, high)))
    return Shape(*spec, centre[0], centre[1], size)


def _position_scene(rng, image_size, answer):
    """1-4 distinct objects, each alone in its grid cell with its centre clear of the cell boundaries;
    shapes[0], the target, is in the cell `answer` names."""
    specs = _distinct_specs(rng, int(rng.integers(1, 5)))
    target = POSITIONS.index(answer)
    cells = [target] + [int(c) for c in rng.permutation([c for c in range(9) if c != target])[: len(specs) - 1]]
    # Each object is drawn inside its own cell: a random layout (as `place` draws) meets these rules too
    # rarely, e.g. 1 try in 130 for four objects around a central target.
    lo, hi = (max(f * image_size, MIN_OBJECT_PX) for f in POSITION_SIZES)
    for attempt in range(400):
        if attempt and attempt % 100 == 0 and len(specs) > 1:  # crowded (small images): one object fewer
            specs, cells = specs[:-1], cells[:-1]
        shapes = [_in_cell(rng, spec, cell, float(rng.uniform(lo, hi)), image_size) for spec, cell in zip(specs, cells)]
        if all(_apart(a, b, 2.0) for j, a in enumerate(shapes) for b in shapes[j + 1:]):
            assert _position_layout_ok(shapes, image_size) and position_of(shapes[0].cx, shapes[0].cy, image_size) == answer
            return shapes
    raise RuntimeError(f"could not place {len(specs)} shapes in a {image_size} px image; use a larger image_size")


def _position_question(rng, s: Shape) -> str:
    return _pick(rng, POSITION_QUESTIONS).format(ref=_describe(rng, s))


def _position(rng, image_size, i, state):
    answer = _balanced(rng, state, "position", POSITIONS, i)
    shapes = _position_scene(rng, image_size, answer)
    qa = [(_position_question(rng, shapes[0]), answer)]
    if len(shapes) > 1 and rng.random() < 1 / 3:  # ~a quarter of all rows: a second object of the same image
        other = shapes[1 + int(rng.integers(len(shapes) - 1))]
        qa.append((_position_question(rng, other), position_of(other.cx, other.cy, image_size)))
    return render(rng, image_size, shapes), qa


def _balanced(rng, state: dict, key: str, values, i: int):
    """Answers in shuffled blocks that hold each value once: exactly balanced every len(values) rows."""
    values = list(values)
    if i % len(values) == 0:
        state[key] = [values[j] for j in rng.permutation(len(values))]
    return state[key][i % len(values)]


GENERATORS = {
    "shapes": _shapes,
    "count": _count,
    "spatial": _spatial,
    "ocr": _ocr,
    "mc": _mc,
    "grounding": _grounding,
    "position": _position,
}
assert tuple(GENERATORS) == SUBSETS


# -----------------------------------------------------------------------------
# public API


def generate(subset: str, n: int, seed: int = 0, image_size: int = 64) -> list[dict]:
    """n rows of one synthetic subset, in the_cauldron schema; the same (subset, seed) gives the same rows.

    Rows are drawn one after the other from one Generator, so generate(s, 10, seed) is the first ten
    rows of generate(s, 100, seed).
    """
    if subset not in GENERATORS:
        raise ValueError(f"unknown subset {subset!r}; choose from {SUBSETS}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if image_size < 32:
        raise ValueError(f"image_size={image_size} is too small to draw legible shapes; use 32 or more")
    rng, state, rows = _rng(subset, seed), {}, []
    for i in range(n):
        image, qa = GENERATORS[subset](rng, image_size, i, state)
        texts = [{"user": q, "assistant": a, "source": f"synthetic-{subset}"} for q, a in qa]
        rows.append({"images": [image], "texts": texts})
    return rows


def small_objects(n: int, seed: int = 0, image_size: int = 144, scale: float = 0.5) -> list[dict]:
    """n rows of `shapes` questions (colour or shape of one of 1-3 distinct objects) on a large picture whose objects
    are `scale` times the shapes subset's share of it: at 144 px and 0.5, objects 16-26 px wide, the size the
    demo's ViT reads at 72 px, but only 8-13 px once the picture is shrunk to 72. The case image splitting is for
    (lesson 08): split into 72 px tiles, each object is back to the size the encoder knows. Its own random stream,
    so the committed subsets do not change."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0 < scale <= 1:
        raise ValueError(f"scale is the objects' size relative to the shapes subset's, in (0, 1]; got {scale}")
    rng, rows = _rng("small_objects", seed), []
    for _ in range(n):
        specs = _distinct_specs(rng, int(rng.integers(1, 4)))
        shapes = place(rng, specs, image_size, (0.22 * scale, 0.36 * scale))
        question, answer = _attribute_question(rng, _pick(rng, shapes), _pick(rng, ("colour", "shape")))
        rows.append({"images": [render(rng, image_size, shapes)],
                     "texts": [{"user": question, "assistant": answer, "source": "synthetic-small_objects"}]})
    return rows


def generate_mix(subsets: dict[str, int], seed: int = 0, image_size: int = 64) -> list[dict]:
    """Rows from several subsets ({name: n}), shuffled together deterministically for the seed."""
    rows = [row for name, n in subsets.items() for row in generate(name, n, seed, image_size)]
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[j] for j in order]


# -----------------------------------------------------------------------------
# parquet (the HF datasets layout: images as {"bytes", "path"} structs)

# `datasets` reads this schema metadata to turn the structs back into PIL images. "Sequence" and the
# list-of-dict form are understood by every datasets version from 2.x on.
HF_FEATURES = {
    "images": {"feature": {"_type": "Image"}, "_type": "Sequence"},
    "texts": [{k: {"dtype": "string", "_type": "Value"} for k in ("user", "assistant", "source")}],
}
ARROW_SCHEMA = pa.schema(
    [
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("texts", pa.list_(pa.struct([(k, pa.string()) for k in ("user", "assistant", "source")]))),
    ],
    metadata={"huggingface": json.dumps({"info": {"features": HF_FEATURES}})},
)


def png_bytes(image) -> bytes:
    """PNG bytes of a PIL image (raw bytes pass through, so tests can store deliberately broken ones)."""
    if isinstance(image, bytes):
        return image
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)  # no timestamps or text chunks: deterministic
    return buffer.getvalue()


def write_parquet(rows: list[dict], path: str | Path) -> Path:
    """Write rows (PIL images or raw bytes) as parquet that `datasets` reads with images decoded."""
    table = pa.Table.from_pylist(
        [
            {
                "images": [{"bytes": png_bytes(im), "path": None} for im in row.get("images") or []],
                "texts": row.get("texts") or [],
            }
            for row in rows
        ],
        schema=ARROW_SCHEMA,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd", row_group_size=500)
    return path


# -----------------------------------------------------------------------------
# gallery


def _row_caption(row: dict, width: int) -> str:
    lines = []
    for turn in row["texts"]:
        question = turn["user"].replace("\n" + MC_INSTRUCTION, "").replace("\nOptions:\n", "\n")
        for k, part in enumerate(question.split("\n")):
            lines += textwrap.wrap(("Q: " if k == 0 else "   ") + part, width) or [""]
        lines.append("A: " + turn["assistant"])
    return "\n".join(lines)


def gallery(rows: list[dict], ncols: int = 6, width: int = 26):
    """A matplotlib Figure of the rows' first images with their questions and answers underneath."""
    from matplotlib.figure import Figure  # no pyplot: works with any backend, including none

    if not rows:
        raise ValueError("gallery() needs at least one row")
    ncols = min(ncols, len(rows))
    captions = [_row_caption(row, width) for row in rows]
    grid = [list(range(k, min(k + ncols, len(rows)))) for k in range(0, len(rows), ncols)]
    # Sizes in inches: each grid row is as tall as its image plus its longest caption.
    cell, image, line, pad = 2.1, 1.9, 0.125, 0.15
    heights = [image + pad + line * max(captions[k].count("\n") + 1 for k in ks) for ks in grid]
    fig_w, fig_h = cell * ncols + pad, sum(heights) + pad
    fig = Figure(figsize=(fig_w, fig_h), dpi=100)
    top = fig_h - pad
    for ks, height in zip(grid, heights):
        for col, k in enumerate(ks):
            left = pad + col * cell
            ax = fig.add_axes([left / fig_w, (top - image) / fig_h, image / fig_w, image / fig_h])
            ax.imshow(rows[k]["images"][0], interpolation="nearest")
            ax.set_axis_off()
            fig.text(left / fig_w, (top - image - 0.05) / fig_h, captions[k], va="top", ha="left",
                     fontsize=7, family="DejaVu Sans Mono")
        top -= height
    return fig


# -----------------------------------------------------------------------------
# regeneration entry point


def build(out: str | Path, train_sizes: dict[str, int] | None = None, test_size: int = TEST_SIZE,
          image_size: int = 64, subsets=SUBSETS, splits=("train", "test"), with_gallery: bool = True) -> dict:
    """Write {subset}/{split}.parquet (+ gallery.png) under `out`; returns {path: number of rows}."""
    out = Path(out)
    sizes = {"train": train_sizes or TRAIN_SIZES, "test": dict.fromkeys(SUBSETS, test_size)}
    written = {}
    for subset in subsets:
        for split in splits:
            rows = generate(subset, sizes[split][subset], SPLIT_SEEDS[split], image_size)
            path = write_parquet(rows, out / subset / f"{split}.parquet")
            written[str(path)] = len(rows)
    if with_gallery:
        # Two held-out rows per subset, one column per subset; the test split's seed, so it shows test data.
        pairs = [generate(subset, 2, SPLIT_SEEDS["test"], image_size) for subset in SUBSETS]
        rows = [pair[k] for k in range(2) for pair in pairs]
        fig = gallery(rows, ncols=len(SUBSETS))
        fig.savefig(out / "gallery.png", metadata={"Software": None})  # no version string: stable bytes
        written[str(out / "gallery.png")] = len(rows)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the mini-cauldron parquet files (deterministic).")
    parser.add_argument("--out", required=True, help="output directory, e.g. assets/mini_cauldron")
    parser.add_argument("--subsets", default=",".join(SUBSETS), help="comma-separated subset names")
    parser.add_argument("--splits", default="train,test", help="comma-separated: train,test")
    parser.add_argument("--train-size", type=int, default=None, help="rows per subset in train (default: TRAIN_SIZES)")
    parser.add_argument("--test-size", type=int, default=TEST_SIZE)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--no-gallery", action="store_true")
    args = parser.parse_args(argv)
    subsets = [s for s in args.subsets.split(",") if s]
    splits = [s for s in args.splits.split(",") if s]
    for name in subsets:
        if name not in SUBSETS:
            parser.error(f"unknown subset {name!r}; choose from {','.join(SUBSETS)}")
    for name in splits:
        if name not in SPLIT_SEEDS:
            parser.error(f"unknown split {name!r}; choose from {','.join(SPLIT_SEEDS)}")
    train_sizes = dict.fromkeys(SUBSETS, args.train_size) if args.train_size is not None else None
    start = time.perf_counter()
    written = build(args.out, train_sizes, args.test_size, args.image_size, subsets, splits, not args.no_gallery)
    seconds = time.perf_counter() - start
    total = sum(Path(p).stat().st_size for p in written)
    for path, n in written.items():
        print(f"{path}: {n} rows, {Path(path).stat().st_size / 1e6:.2f} MB")
    print(f"wrote {len(written)} files, {total / 1e6:.1f} MB in {seconds:.1f} s")


if __name__ == "__main__":
    main()
