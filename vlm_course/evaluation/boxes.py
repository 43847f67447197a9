"""Boxes written as text (grounding, Vary-toy style): parse "[x1, y1, x2, y2]" and score it by IoU.

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
