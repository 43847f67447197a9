"""Boxes as text: 0-1000 normalisation and back, formatting, the lenient parser's decisions, IoU scores.

The strict parser (`parse_box`) and `box_accuracy` are tested in test_evaluation.py.
"""

import random

import pytest

from vlm_course.data import synthetic
from vlm_course.evaluation import (
    accuracy_at_iou,
    box_iou,
    box_ious,
    check_box,
    denormalize_box,
    format_box,
    mean_iou,
    normalize_box,
    parse_box,
    read_box,
)


def test_normalize_box_scales_x_by_width_and_y_by_height():
    assert normalize_box((32, 16, 64, 48), 64, 64) == (500, 250, 1000, 750)
    assert normalize_box((50, 10, 100, 20), 200, 40) == (250, 250, 500, 500)  # non-square image
    assert normalize_box((0, 0, 0, 0), 10, 10) == (0, 0, 0, 0)


def test_normalize_then_denormalize_is_the_identity_up_to_rounding():
    rng = random.Random(0)
    for _ in range(200):
        w, h = rng.randint(20, 2000), rng.randint(20, 2000)
        x1, x2 = sorted(rng.uniform(0, w) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, h) for _ in range(2))
        back = denormalize_box(normalize_box((x1, y1, x2, y2), w, h), w, h)
        # rounding to 0-1000 moves a coordinate by at most half a unit: W / 2000 pixels
        assert all(abs(a - b) <= 0.5 * s / 1000 + 1e-9 for a, b, s in zip(back, (x1, y1, x2, y2), (w, h, w, h)))


def test_the_generator_writes_the_box_normalize_box_gives():
    """The grounding subset's answers are format_box(normalize_box(pixel box)) of the target shape."""
    shape = synthetic.Shape("circle", "red", cx=20.0, cy=30.0, size=12.0)
    assert synthetic.box_text(shape, 64) == format_box(normalize_box(shape.box, 64, 64))


@pytest.mark.parametrize("box, match", [
    ((30, 0, 10, 5), "x2 < x1"),            # corners swapped
    ((0, 30, 10, 5), "x2 < x1 or y2 < y1"),
    ((0, 0, 70, 10), "outside"),            # wider than the 64 px image
    ((-1, 0, 10, 10), "outside"),
    ((0, 0, 10), "four numbers"),
    ("[0, 0, 10, 10]", "four numbers"),     # text is parsed, not given
])
def test_normalize_box_refuses_a_broken_given_box(box, match):
    with pytest.raises(ValueError, match=match):
        normalize_box(box, 64, 64)


def test_given_0_1000_boxes_are_checked_too():
    with pytest.raises(ValueError, match="x2 < x1"):
        format_box((500, 0, 100, 10))
    with pytest.raises(ValueError, match="outside 0-1000"):
        denormalize_box((0, 0, 1001, 10), 64, 64)
    with pytest.raises(ValueError, match="NaN"):
        check_box((0, 0, float("nan"), 1))
    with pytest.raises(ValueError, match="positive"):
        normalize_box((0, 0, 1, 1), 0, 64)
    assert format_box((10.4, 20.6, 300, 400)) == "[10, 21, 300, 400]"


@pytest.mark.parametrize("text, expected", [
    ("[100, 200, 300, 400]", (100.0, 200.0, 300.0, 400.0)),
    ("The red circle is at [100, 200, 300, 400], near the top.", (100.0, 200.0, 300.0, 400.0)),  # extra words
    ("(100,200),(300,400)", (100.0, 200.0, 300.0, 400.0)),
    ("box: 100, 200, 300, 400", (100.0, 200.0, 300.0, 400.0)),           # four numbers in a row
    ("2 circles; the first at 100 200 300 400", (100.0, 200.0, 300.0, 400.0)),  # "2" is not part of the run
    ("[300, 400, 100, 200]", (100.0, 200.0, 300.0, 400.0)),              # corners swapped: sorted
    ("[300, 200, 100, 400]", (100.0, 200.0, 300.0, 400.0)),              # only x swapped
    ("[-5, 20, 1012, 40]", (0.0, 20.0, 1000.0, 40.0)),                   # out of range: clipped
    ("[0.1, 0.2, 0.5, 0.6]", (0.1, 0.2, 0.5, 0.6)),                      # no guessing of a 0-1 scale
    ("[1, 2, 3]", None),                                                 # three numbers
    ("somewhere on the left", None),
    ("", None),
])
def test_read_box_repairs_what_it_documents(text, expected):
    assert read_box(text) == expected


def test_read_box_and_parse_box_agree_on_well_formed_boxes():
    rng = random.Random(1)
    for _ in range(200):
        x1, x2 = sorted(rng.randint(0, 1000) for _ in range(2))
        y1, y2 = sorted(rng.randint(0, 1000) for _ in range(2))
        text = f"It is at {format_box((x1, y1, x2, y2))}."
        assert read_box(text) == parse_box(text) == (x1, y1, x2, y2)


def test_read_box_refuses_non_text():
    with pytest.raises(TypeError, match="string"):
        read_box([1, 2, 3, 4])


def test_scores_over_predictions():
    golds = ["[0, 0, 100, 100]", "[0, 0, 100, 100]", (0, 0, 100, 100), "[500, 500, 600, 600]"]
    predictions = ["[0, 0, 100, 100]", "[50, 0, 150, 100]", "no box", "[600, 500, 500, 600]"]
    assert box_ious(predictions, golds) == pytest.approx([1.0, 1 / 3, 0.0, 0.0])  # strict: swapped box is 0
    assert box_ious(predictions, golds, lenient=True) == pytest.approx([1.0, 1 / 3, 0.0, 1.0])
    assert mean_iou(predictions, golds) == pytest.approx((1 + 1 / 3) / 4)
    assert accuracy_at_iou(predictions, golds) == 0.25
    assert accuracy_at_iou(predictions, golds, lenient=True) == 0.5
    assert accuracy_at_iou(predictions, golds, threshold=0.3) == 0.5
    # IoU exactly 0.5 counts, as box_accuracy's >=
    assert accuracy_at_iou(["[0, 0, 50, 100]"], ["[0, 0, 100, 100]"]) == 1.0
    assert box_iou((0, 0, 50, 100), (0, 0, 100, 100)) == 0.5


def test_scores_refuse_mismatched_or_broken_input():
    with pytest.raises(ValueError, match="2 predictions for 1"):
        mean_iou(["[0, 0, 1, 1]", "x"], ["[0, 0, 1, 1]"])
    with pytest.raises(ValueError, match="cannot be read"):
        mean_iou(["[0, 0, 1, 1]"], ["the left half"])
    with pytest.raises(ValueError, match="x2 < x1"):
        accuracy_at_iou(["[0, 0, 1, 1]"], [(10, 0, 5, 1)])
    with pytest.raises(ValueError, match="no predictions"):
        mean_iou([], [])
