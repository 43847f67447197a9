"""The scene composer's rules: what the room may compose and ask, and pictures drawn like the training scenes."""

import numpy as np
import pytest

from vlm_course.data import synthetic
from vlm_course.scene_composer import (
    MAX_QUESTION_CHARS,
    POSITIONS,
    SceneError,
    SceneObject,
    compose_scene,
    describe,
    place_scene,
    right_answer,
    suggested_questions,
    validate_question,
    validate_scene,
)

FOUR = [("circle", "red", "top left"), ("square", "blue", "center"), ("triangle", "green", "top"),
        ("diamond", "yellow", "left")]  # four neighbours around one corner: the most crowded layout


# ----------------------------------------------------------------------------------------------
# Bad input: a message that says what to change


def test_five_objects_are_refused_with_the_limit_and_what_to_do():
    with pytest.raises(SceneError, match=r"5 objects: a scene holds at most 4.*remove 1 object$"):
        validate_scene(FOUR + [("circle", "purple", "bottom right")])


def test_two_objects_in_one_cell_are_refused_naming_the_cell_and_both_objects():
    with pytest.raises(SceneError, match=r"two objects in the center cell \(the red circle and the blue square\)"):
        validate_scene([("circle", "red", "center"), ("square", "blue", "center")])


@pytest.mark.parametrize("objects", [[], None])
def test_an_empty_scene_is_refused(objects):
    with pytest.raises(SceneError, match="the scene is empty: add an object"):
        validate_scene(objects)


@pytest.mark.parametrize("item, message", [
    (("hexagon", "red", "top"), r"'hexagon' is not a shape the model knows; choose one of circle, square"),
    (("circle", "pink", "top"), r"'pink' is not a colour"),
    (("circle", "red", "middle"), r"'middle' is not a position the model knows; choose one of top left"),
    (("circle", "red"), r"object 1 is \('circle', 'red'\): give \(shape, colour, position\)"),
    ({"shape": "circle", "colour": "red"}, r"object 1 has no 'position'"),
    (7, r"object 1 is 7"),
])
def test_unknown_names_and_malformed_objects_are_refused(item, message):
    with pytest.raises(SceneError, match=message):
        validate_scene([item])


def test_objects_come_as_tuples_dicts_or_scene_objects_with_spaces_and_case_ignored():
    scene = validate_scene([(" Circle", "RED", "Top Left "), {"shape": "square", "colour": "blue", "position": "center"},
                            SceneObject("diamond", "green", "bottom")])
    assert scene == [SceneObject("circle", "red", "top left"), SceneObject("square", "blue", "center"),
                     SceneObject("diamond", "green", "bottom")]


@pytest.mark.parametrize("question", ["", "   ", "\n\t", None])
def test_an_empty_question_is_refused(question):
    with pytest.raises(SceneError, match="the question is empty: type one"):
        validate_question(question)


def test_questions_too_long_not_text_or_with_an_image_marker_are_refused():
    with pytest.raises(SceneError, match=f"{MAX_QUESTION_CHARS + 1} characters"):
        validate_question("x" * (MAX_QUESTION_CHARS + 1))
    with pytest.raises(SceneError, match="must be text, got int"):
        validate_question(3)
    with pytest.raises(SceneError, match="take '<image>' out"):
        validate_question("<image> What colour is the circle?")
    assert validate_question("  What colour is the circle? \n") == "What colour is the circle?"


def test_scene_errors_are_value_errors():
    """Callers that already catch ValueError (the panel, the processor's checks) catch these too."""
    assert issubclass(SceneError, ValueError)


# ----------------------------------------------------------------------------------------------
# Drawing: the position subset's rules


@pytest.mark.parametrize("seed", range(20))
def test_every_object_lies_alone_in_its_cell_clear_of_the_boundaries_and_inside_the_image(seed):
    rng = np.random.default_rng(seed)
    n = 1 + seed % 4
    cells = rng.permutation(9)[:n]
    objects = [(synthetic.SHAPES[k % 4], synthetic.COLOURS[k % 6], POSITIONS[c]) for k, c in enumerate(cells)]
    shapes = place_scene(objects, seed)
    margin = synthetic.POSITION_MARGIN * 64
    for (shape, colour, position), s in zip(objects, shapes):
        assert (s.shape, s.colour) == (shape, colour)
        assert synthetic.position_of(s.cx, s.cy, 64) == position
        for v in (s.cx, s.cy):
            assert min(abs(v - line) for line in (64 / 3, 128 / 3)) >= margin
        x1, y1, x2, y2 = s.box
        assert x1 >= 0 and y1 >= 0 and x2 <= 64 and y2 <= 64
        assert 0.2 * 64 <= s.size <= 0.3 * 64
    for j, a in enumerate(shapes):
        for b in shapes[j + 1:]:
            ax1, ay1, ax2, ay2 = a.box
            bx1, by1, bx2, by2 = b.box
            assert ax2 + 2 <= bx1 or bx2 + 2 <= ax1 or ay2 + 2 <= by1 or by2 + 2 <= ay1, (a, b)


def test_the_fallback_layout_keeps_the_rules_too(monkeypatch):
    """When random draws keep touching, the smallest objects sit at the cell centres: still one per cell, apart."""
    from vlm_course import scene_composer

    monkeypatch.setattr(scene_composer, "_apart", lambda a, b, gap=2.0: False)  # no random layout is accepted
    shapes = place_scene(FOUR)
    assert [synthetic.position_of(s.cx, s.cy, 64) for s in shapes] == [o[2] for o in FOUR]
    for j, a in enumerate(shapes):
        for b in shapes[j + 1:]:
            assert abs(a.cx - b.cx) >= a.size + 2 or abs(a.cy - b.cy) >= a.size + 2


def test_the_picture_is_64_px_and_shows_each_object_in_its_colour_at_its_centre():
    image, shapes = compose_scene(FOUR)
    assert image.size == (64, 64) and image.mode == "RGB"
    pixels = np.asarray(image).astype(int)
    for s in shapes:
        # a triangle's centre of box is inside it too: (cx, cy) lies below the apex, above the base
        drawn = pixels[int(s.cy), int(s.cx)]
        assert np.abs(drawn - np.array(synthetic.PALETTE[s.colour])).max() <= 12, (s, drawn)
    corner = pixels[62, 62]  # bottom right: no object there, the light background
    assert corner.min() > 200


def test_the_same_scene_and_seed_draw_the_same_picture_and_another_seed_another_layout():
    a, shapes_a = compose_scene(FOUR, seed=3)
    b, shapes_b = compose_scene(FOUR, seed=3)
    c, shapes_c = compose_scene(FOUR, seed=4)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and shapes_a == shapes_b
    assert shapes_c != shapes_a
    assert [synthetic.position_of(s.cx, s.cy, 64) for s in shapes_c] == [o[2] for o in FOUR]


def test_composing_checks_the_scene_first():
    with pytest.raises(SceneError, match="two objects in the top cell"):
        compose_scene([("circle", "red", "top"), ("square", "blue", "top")])


# ----------------------------------------------------------------------------------------------
# Words about the scene


def test_describe_names_each_object_and_its_cell():
    assert describe(FOUR[:2]) == "red circle (top left), blue square (center)"


def test_suggested_questions_are_only_those_the_scene_decides():
    scene = [("circle", "red", "top left"), ("circle", "blue", "center"), ("square", "red", "bottom")]
    questions = suggested_questions(scene)
    # two circles: "What colour is the circle?" has no single answer; two red objects: nor has the shape question
    assert "What colour is the circle?" not in questions and "What shape is the red object?" not in questions
    assert questions["What colour is the square?"] == "red"
    assert questions["What shape is the blue object?"] == "circle"
    assert questions["In which part of the image is the blue circle?"] == "center"
    assert questions["In which part of the image is the red square?"] == "bottom"
    assert questions["How many objects are there?"] == "3"
    assert questions["How many circles are there?"] == "2"
    assert "How many triangles are there?" not in questions
    # the training data's own wording, so the trained model meets questions like those it learnt from
    assert "What colour is the {shape}?" in synthetic.COLOUR_QUESTIONS


def test_right_answer_only_for_questions_the_scene_decides():
    assert right_answer(FOUR, "  what colour is   the circle? ") == "red"
    assert right_answer(FOUR, "In which part of the image is the green triangle?") == "top"
    assert right_answer(FOUR, "Is the circle happy?") is None
