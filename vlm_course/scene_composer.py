"""The scene composer's plain logic: the room names up to four objects, the mini-cauldron's renderer draws them.

    validate_scene(objects)       the objects as SceneObjects, or a SceneError that says what to change
    validate_question(text)       the question stripped, or a SceneError (empty, too long, an <image> marker)
    compose_scene(objects)        (64 px PIL image, the drawn synthetic.Shape list)
    describe(objects)             "red circle (top left), blue square (center)"
    suggested_questions(objects)  {question: right answer} for questions the scene decides, in training wording

A scene follows the rules of the mini-cauldron's `position` subset, so the trained model sees the kind of
picture it learnt from: one object per cell of the 3 x 3 grid, each centre at least POSITION_MARGIN (3 px of
64) from the cell boundaries, objects 0.2-0.3 of the image side, never overlapping (2 px apart), drawn by
`synthetic.render` (supersampled shapes in the mini-cauldron's palette over a light background).

Nothing here needs torch or widgets: the panel in `vlm_course.demo_panel` shows the messages, and the tests
check every rule without a model.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .data import synthetic

MAX_OBJECTS = 4  # as in the position subset: 1-4 objects
MAX_QUESTION_CHARS = 200
SCENE_SIZE = 64  # the mini-cauldron's image side
SHAPES = synthetic.SHAPES
COLOURS = synthetic.COLOURS
POSITIONS = synthetic.POSITIONS


class SceneError(ValueError):
    """A scene or a question the composer cannot draw or ask; the message says what to change."""


@dataclass(frozen=True)
class SceneObject:
    shape: str  # one of SHAPES
    colour: str  # one of COLOURS
    position: str  # one of POSITIONS: "top left" ... "bottom right"

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def _as_object(item, k: int) -> SceneObject:
    if isinstance(item, SceneObject):
        values = (item.shape, item.colour, item.position)
    elif isinstance(item, Mapping):
        try:
            values = (item["shape"], item["colour"], item["position"])
        except KeyError as err:
            raise SceneError(f"object {k + 1} has no {err.args[0]!r}: give a shape, a colour and a position") from None
    else:
        try:
            values = tuple(item)
        except TypeError:
            raise SceneError(f"object {k + 1} is {item!r}: give (shape, colour, position)") from None
        if len(values) != 3:
            raise SceneError(f"object {k + 1} is {item!r}: give (shape, colour, position)")
    shape, colour, position = (v.strip().lower() if isinstance(v, str) else v for v in values)
    for value, allowed, what in ((shape, SHAPES, "shape"), (colour, COLOURS, "colour"), (position, POSITIONS, "position")):
        if value not in allowed:
            raise SceneError(f"object {k + 1}: {value!r} is not a {what} the model knows; choose one of {', '.join(allowed)}")
    return SceneObject(shape, colour, position)


def validate_scene(objects: Iterable) -> list[SceneObject]:
    """The objects (SceneObjects, (shape, colour, position) tuples or dicts) checked against the scene rules.

    Raises SceneError for no object, more than MAX_OBJECTS, an unknown shape, colour or position, or two objects
    in one cell."""
    if objects is None:
        raise SceneError("the scene is empty: add an object (a shape, a colour and a position)")
    scene = [_as_object(item, k) for k, item in enumerate(objects)]
    if not scene:
        raise SceneError("the scene is empty: add an object (a shape, a colour and a position)")
    if len(scene) > MAX_OBJECTS:
        extra = len(scene) - MAX_OBJECTS
        raise SceneError(f"{len(scene)} objects: a scene holds at most {MAX_OBJECTS} (the model learnt from scenes "
                         f"of 1 to {MAX_OBJECTS}); remove {extra} object{'s' if extra > 1 else ''}")
    seen: dict[str, SceneObject] = {}
    for obj in scene:
        if obj.position in seen:
            raise SceneError(f"two objects in the {obj.position} cell (the {seen[obj.position].name} and the {obj.name}): "
                             f"each cell holds one object; move one of them")
        seen[obj.position] = obj
    return scene


def validate_question(question) -> str:
    """The question without surrounding spaces; SceneError when it is missing, empty, too long or has <image>."""
    if question is None or (isinstance(question, str) and not question.strip()):
        raise SceneError("the question is empty: type one, e.g. 'What colour is the circle?'")
    if not isinstance(question, str):
        raise SceneError(f"the question must be text, got {type(question).__name__}")
    question = question.strip()
    if len(question) > MAX_QUESTION_CHARS:
        raise SceneError(f"the question has {len(question)} characters: keep it under {MAX_QUESTION_CHARS} "
                         f"(the model was trained on one-line questions)")
    if "<image>" in question:
        raise SceneError("take '<image>' out of the question: the picture is put before it for you")
    return question


# ----------------------------------------------------------------------------------------------
# Drawing


def _scene_key(scene: list[SceneObject]) -> int:
    text = ";".join(f"{o.shape},{o.colour},{o.position}" for o in scene)
    return zlib.crc32(text.encode())


def _centre_range(k: int, size: float, image_size: int) -> tuple[float, float]:
    """Where a centre may lie along one axis for grid index k: inside the cell, POSITION_MARGIN from its
    boundaries, and far enough from the image edge that the whole object is inside the image."""
    margin = synthetic.POSITION_MARGIN * image_size
    low = max(k * image_size / 3 + margin, size / 2 + 1)
    high = min((k + 1) * image_size / 3 - margin, image_size - size / 2 - 1)
    return low, high


def _apart(a: synthetic.Shape, b: synthetic.Shape, gap: float = 2.0) -> bool:
    ax1, ay1, ax2, ay2 = a.box
    bx1, by1, bx2, by2 = b.box
    return ax2 + gap <= bx1 or bx2 + gap <= ax1 or ay2 + gap <= by1 or by2 + gap <= ay1


def place_scene(objects, seed: int = 0, image_size: int = SCENE_SIZE) -> list[synthetic.Shape]:
    """The objects as synthetic.Shapes, each in its cell; the same scene and seed give the same layout."""
    scene = validate_scene(objects)
    if image_size < 48:
        raise SceneError(f"image_size={image_size} is too small for four objects in their cells; use 48 or more")
    rng = np.random.default_rng([_scene_key(scene), seed])
    lo, hi = (max(f * image_size, synthetic.MIN_OBJECT_PX) for f in synthetic.POSITION_SIZES)
    cells = [divmod(POSITIONS.index(o.position), 3) for o in scene]  # (row, column)
    for _attempt in range(200):
        shapes = []
        for obj, (row, col) in zip(scene, cells):
            size = float(rng.uniform(lo, hi))
            cx, cy = (float(rng.uniform(*_centre_range(k, size, image_size))) for k in (col, row))
            shapes.append(synthetic.Shape(obj.shape, obj.colour, cx, cy, size))
        if all(_apart(a, b) for j, a in enumerate(shapes) for b in shapes[j + 1:]):
            return shapes
    # Neighbours drawn large near their shared boundary kept touching: the smallest objects at the cell centres
    # are always apart (neighbouring centres are a third of the side apart, more than one object's side + the gap).
    return [synthetic.Shape(o.shape, o.colour, (col + 0.5) * image_size / 3, (row + 0.5) * image_size / 3, lo)
            for o, (row, col) in zip(scene, cells)]


def compose_scene(objects, seed: int = 0, image_size: int = SCENE_SIZE) -> tuple[Image.Image, list[synthetic.Shape]]:
    """(the picture, its shapes): the objects drawn by the mini-cauldron's renderer, one per cell."""
    scene = validate_scene(objects)
    shapes = place_scene(scene, seed, image_size)
    rng = np.random.default_rng([_scene_key(scene), seed, 1])  # the background's own stream
    return synthetic.render(rng, image_size, shapes), shapes


# ----------------------------------------------------------------------------------------------
# Words about a scene


def describe(objects) -> str:
    """One line naming each object and its cell, in the order given."""
    return ", ".join(f"{o.name} ({o.position})" for o in validate_scene(objects))


def suggested_questions(objects) -> dict[str, str]:
    """Questions the scene answers unambiguously, worded as in the training data, with their right answers."""
    scene = validate_scene(objects)
    shape_count = {s: sum(o.shape == s for o in scene) for s in SHAPES}
    colour_count = {c: sum(o.colour == c for o in scene) for c in COLOURS}
    name_count = {o.name: sum(p.name == o.name for p in scene) for o in scene}
    questions: dict[str, str] = {}
    for o in scene:
        if shape_count[o.shape] == 1:
            questions[synthetic.COLOUR_QUESTIONS[0].format(shape=o.shape)] = o.colour
        if name_count[o.name] == 1:
            questions[synthetic.POSITION_QUESTIONS[0].format(ref=o.name)] = o.position
        if colour_count[o.colour] == 1:
            questions[synthetic.SHAPE_QUESTIONS[0].format(colour=o.colour)] = o.shape
    questions[synthetic.COUNT_QUESTIONS["total"][0]] = str(len(scene))
    for s in SHAPES:
        if shape_count[s]:
            questions[synthetic.COUNT_QUESTIONS["shape"][0].format(shape=s)] = str(shape_count[s])
    return questions


def right_answer(objects, question: str) -> str | None:
    """The right answer when the question is one of suggested_questions (spaces and case aside), else None."""
    wanted = " ".join(question.split()).lower()
    for text, answer in suggested_questions(objects).items():
        if text.lower() == wanted:
            return answer
    return None
