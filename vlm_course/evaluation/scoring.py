"""Which metric scores which question: a subset's name picks VQA accuracy, the MMStar letter, ANLS or box IoU.
"""

from __future__ import annotations

from collections.abc import Sequence

from .boxes import box_accuracy
from .docvqa import anls
from .mmstar import mmstar_match
from .vqa import _as_answer_list, normalize_answer, vqa_accuracy

METRICS = ("vqa", "mc", "anls", "box")
# Subsets whose answers need a metric other than VQA accuracy. Anything not listed is a short open answer.
SUBSET_METRICS = {
    "mc": "mc", "mmstar": "mc",                                        # a letter: lmms-eval's MMStar rule
    "grounding": "box",                                                # "[x1, y1, x2, y2]": IoU >= 0.5
    "ocr": "anls", "doc": "anls", "docvqa": "anls", "infographicvqa": "anls",  # text read off the image
}
# A record counts as right (green in the gallery) at this score. Binary metrics give 0 or 1; this also
# counts VQA's 0.9 (three humans agree) and ANLS's 0.8 (one typo in five letters) as right.
CORRECT_THRESHOLD = 0.5


def metric_for(subset_or_metric: str) -> str:
    """The metric name ("vqa", "mc", "anls" or "box") for a subset name or a metric name."""
    if subset_or_metric in METRICS:
        return subset_or_metric
    return SUBSET_METRICS.get(subset_or_metric, "vqa")


def exact_answer_match(subset_or_metric: str, prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when the model said exactly a gold answer, else 0.0; reported next to every metric.

    It is the strictest reading, so its gap to the metric shows how much partial credit (ANLS) or lenient
    parsing (MMStar's letter rules; lmms-eval calls that one `exact_match`, here `mmstar_match`) adds.
    Multiple choice: the prediction is the letter alone ("b" or "B").
    Otherwise: equal after VQA normalisation; an empty prediction never counts (the letter "A" and the
    word "the" both normalise to "", since articles are dropped).
    """
    gold = _as_answer_list(answers, f"exact_answer_match({subset_or_metric!r})")
    if metric_for(subset_or_metric) == "mc":
        return float(prediction.strip().upper() == gold[0].strip().upper())
    predicted = normalize_answer(prediction)
    return float(prediction.strip() != "" and any(predicted == normalize_answer(answer) for answer in gold))


def _multiple_choice_score(prediction: str, letter: str) -> float:
    if len(letter.strip()) != 1 or not letter.strip().isalpha():
        raise ValueError(f"multiple choice: the gold answer must be one option letter such as 'B', got {letter!r}")
    return mmstar_match(prediction, letter)


def score_answer(subset_or_metric: str, prediction: str, answers: str | Sequence[str]) -> float:
    """Score one prediction with the metric its subset needs (see `metric_for`).

    mc -> `mmstar_match` on the gold letter; grounding -> `box_accuracy` (best over gold boxes);
    ocr / doc -> `anls`; anything else -> `vqa_accuracy`.
    """
    metric = metric_for(subset_or_metric)
    gold = _as_answer_list(answers, f"score_answer({subset_or_metric!r})")
    if metric == "mc":
        return _multiple_choice_score(prediction, gold[0])
    if metric == "box":
        return max(box_accuracy(prediction, box) for box in gold)
    if metric == "anls":
        return anls(prediction, gold)
    return vqa_accuracy(prediction, gold)
