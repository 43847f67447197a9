"""Boxes written as text (grounding, Vary-toy style): parse "[x1, y1, x2, y2]" and score it by IoU.

Vary-toy (arXiv 2401.12503), like Qwen-VL, writes a box as plain text with its coordinates normalised to 0-1000, so
one vocabulary of digits serves every image size:

    pixel box (x1, y1, x2, y2) in a W x H image  --normalize_box-->  0-1000 ints  --format_box-->  "[x1, y1, x2, y2]"
    a model's text  --parse_box (strict) / read_box (lenient)-->  0-1000 box  --box_iou-->  overlap with the gold box

A box that is *given* (data, a gold answer) must be well formed: `check_box` refuses x2 < x1, y2 < y1 and
coordinates outside the range, with an error that says what is wrong. A box a model *wrote* is parsed instead:
`parse_box` gives no credit to a broken one (the scorer `box_accuracy` uses it), `read_box` repairs what can be
repaired (see its docstring for each case).

Pure Python: no torch, no numpy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

Box = tuple[float, float, float, float]
BOX_SCALE = 1000.0  # coordinates are normalised to 0-1000, as in Vary-toy and the course's grounding data
_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BRACKET_BOX = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")                         # [x1, y1, x2, y2]
_CORNER_BOX = re.compile(r"\(" + _NUMBER + "," + _NUMBER + r"\)\s*,?\s*\(" + _NUMBER + "," + _NUMBER + r"\)")


def parse_box(text: str) -> Box | None:
    """Read the first box in `text`: "[x1, y1, x2, y2]" or "(x1,y1),(x2,y2)", coordinates in 0-1000.

    Returns (x1, y1, x2, y2) as floats, or None when there is no box, or when it is not a valid one
    (a coordinate outside 0-1000, or x2 < x1 or y2 < y1): a model that writes a broken box gets no credit.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_box expects a string, got {type(text).__name__}: {text!r}")
    matches = [m for m in (_BRACKET_BOX.search(text), _CORNER_BOX.search(text)) if m is not None]
    if not matches:
        return None
    first = min(matches, key=lambda m: m.start())
    x1, y1, x2, y2 = (float(value) for value in first.groups())
    if not all(0.0 <= value <= BOX_SCALE for value in (x1, y1, x2, y2)) or x2 < x1 or y2 < y1:
        return None
    return (x1, y1, x2, y2)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0.0 when they do not overlap."""
    if len(a) != 4 or len(b) != 4:
        raise ValueError(f"box_iou expects two (x1, y1, x2, y2) boxes, got {tuple(a)!r} and {tuple(b)!r}")
    overlap_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    overlap_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = overlap_w * overlap_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0  # two zero-area boxes: nothing to compare


def box_accuracy(prediction: str, answer_box_text: str | Sequence[float], iou_threshold: float = 0.5) -> float:
    """1.0 when the box in `prediction` overlaps the gold box with IoU >= `iou_threshold` (Acc@0.5), else 0.0.

    A prediction without a readable box scores 0.0. The gold box may be text or four numbers; a gold box
    that cannot be read is a data error and raises.
    """
    gold = parse_box(answer_box_text) if isinstance(answer_box_text, str) else tuple(answer_box_text)
    if gold is None or len(gold) != 4:
        raise ValueError(f"The gold box {answer_box_text!r} cannot be read: write it as '[x1, y1, x2, y2]' "
                         f"or '(x1,y1),(x2,y2)' with coordinates in 0-{BOX_SCALE:.0f}.")
    predicted = parse_box(prediction)
    if predicted is None:
        return 0.0
    return float(box_iou(predicted, gold) >= iou_threshold)


# ----------------------------------------------------------------------------------------------
# Given boxes: checked, normalised to 0-1000 and back, written as text


def check_box(box: Sequence[float], scale: float = BOX_SCALE, height: float | None = None, what: str = "box") -> Box:
    """A given (x1, y1, x2, y2) box as floats, or a ValueError that says what is wrong with it.

    Coordinates must lie in 0-`scale` (x) and 0-`height` (y; default `scale`), with x1 <= x2 and y1 <= y2.
    """
    height = scale if height is None else height
    if isinstance(box, str) or len(box) != 4:
        raise ValueError(f"a {what} is four numbers (x1, y1, x2, y2), got {box!r}")
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError) as err:
        raise ValueError(f"a {what} is four numbers (x1, y1, x2, y2), got {box!r}") from err
    if any(v != v for v in (x1, y1, x2, y2)):
        raise ValueError(f"the {what} {box!r} holds NaN")
    if x2 < x1 or y2 < y1:
        raise ValueError(f"the {what} {tuple(box)!r} has x2 < x1 or y2 < y1: write the top-left corner first, then the "
                         "bottom-right one (x1 <= x2, y1 <= y2)")
    if min(x1, x2) < 0 or max(x1, x2) > scale or min(y1, y2) < 0 or max(y1, y2) > height:
        raise ValueError(f"the {what} {tuple(box)!r} reaches outside 0-{scale:g} x 0-{height:g}: clip it to the image "
                         "(or normalise pixel boxes with normalize_box first)")
    return (x1, y1, x2, y2)


def normalize_box(box: Sequence[float], width: float, height: float) -> tuple[int, int, int, int]:
    """A pixel box in a `width` x `height` image -> integer coordinates in 0-1000 (x by the width, y by the height)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"the image size must be positive, got {width} x {height}")
    x1, y1, x2, y2 = check_box(box, width, height, what="pixel box")
    return (round(x1 * BOX_SCALE / width), round(y1 * BOX_SCALE / height),
            round(x2 * BOX_SCALE / width), round(y2 * BOX_SCALE / height))


def denormalize_box(box: Sequence[float], width: float, height: float) -> Box:
    """A 0-1000 box -> pixel coordinates in a `width` x `height` image (floats: rounding is the caller's choice)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"the image size must be positive, got {width} x {height}")
    x1, y1, x2, y2 = check_box(box)
    return (x1 * width / BOX_SCALE, y1 * height / BOX_SCALE, x2 * width / BOX_SCALE, y2 * height / BOX_SCALE)


def format_box(box: Sequence[float]) -> str:
    """A 0-1000 box as the text a model learns to write: "[x1, y1, x2, y2]", integer coordinates."""
    return "[" + ", ".join(str(round(v)) for v in check_box(box)) + "]"


# ----------------------------------------------------------------------------------------------
# A model's box: read leniently


_RUN_OF_FOUR = re.compile(r"(?<![\d.])" + r"[\s,;]+".join([r"(-?\d+(?:\.\d+)?)"] * 4))


def read_box(text: str) -> Box | None:
    """Read the box a model wrote, repairing what can be repaired; None when there is no box to read.

    What it does with each kind of bad text:
      - extra words around the box ("The circle is at [1, 2, 3, 4]."): ignored; the first box is read.
      - a box in another common form: "[x1, y1, x2, y2]", "(x1,y1),(x2,y2)", or four numbers in a row separated by
        commas or spaces ("x from 10 20 to 30 40" is not one: words break the run).
      - corners in the wrong order ([300, 200, 100, 400]): sorted into (min x, min y, max x, max y); it is the same
        rectangle.
      - numbers outside 0-1000 (-5, 1012): clipped to the range; the box still points at the same place.
      - fewer than four numbers, or none: None (scored as IoU 0).
    It does not guess a scale: a box written in 0-1 ([0.1, 0.2, 0.5, 0.6]) is read as a tiny box near the corner.
    `parse_box` is the strict reading, which gives a broken box no credit.
    """
    if not isinstance(text, str):
        raise TypeError(f"read_box expects a string, got {type(text).__name__}: {text!r}")
    matches = [m for m in (_BRACKET_BOX.search(text), _CORNER_BOX.search(text), _RUN_OF_FOUR.search(text))
               if m is not None]
    if not matches:
        return None
    first = min(matches, key=lambda m: m.start())
    x1, y1, x2, y2 = (min(BOX_SCALE, max(0.0, float(v))) for v in first.groups())
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


# ----------------------------------------------------------------------------------------------
# Scores over a set of predictions


def _gold_box(gold: str | Sequence[float]) -> Box:
    if isinstance(gold, str):
        box = parse_box(gold)
        if box is None:
            raise ValueError(f"The gold box {gold!r} cannot be read: write it as '[x1, y1, x2, y2]' with coordinates "
                             f"in 0-{BOX_SCALE:.0f}.")
        return box
    return check_box(gold, what="gold box")


def box_ious(predictions: Sequence[str], golds: Sequence[str | Sequence[float]], lenient: bool = False) -> list[float]:
    """IoU of each predicted box text with its gold box; 0.0 where no box can be read (strict `parse_box`, or
    `read_box` with lenient=True)."""
    if len(predictions) != len(golds):
        raise ValueError(f"got {len(predictions)} predictions for {len(golds)} gold boxes")
    parse = read_box if lenient else parse_box
    ious = []
    for prediction, gold in zip(predictions, golds):
        box = parse(prediction)
        ious.append(0.0 if box is None else box_iou(box, _gold_box(gold)))
    return ious


def mean_iou(predictions: Sequence[str], golds: Sequence[str | Sequence[float]], lenient: bool = False) -> float:
    """Mean IoU over the predictions (an unreadable box counts 0)."""
    ious = box_ious(predictions, golds, lenient)
    if not ious:
        raise ValueError("mean_iou got no predictions")
    return sum(ious) / len(ious)


def accuracy_at_iou(predictions: Sequence[str], golds: Sequence[str | Sequence[float]], threshold: float = 0.5,
                    lenient: bool = False) -> float:
    """The fraction of predictions whose box overlaps its gold box with IoU >= threshold (Acc@0.5 by default)."""
    ious = box_ious(predictions, golds, lenient)
    if not ious:
        raise ValueError("accuracy_at_iou got no predictions")
    return sum(iou >= threshold for iou in ious) / len(ious)
