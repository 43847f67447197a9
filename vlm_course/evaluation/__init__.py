"""Evaluation: the metrics that VLM papers report, written out so that you can read them, and the eval loops.

Every metric here reproduces a reference scorer, quirks included, so that a number computed with the
course matches the number a paper or leaderboard would report for the same predictions:

    vqa.py       VQA accuracy: the official VQAv2 evaluator (GT-Vision-Lab/VQA, ``vqaEval.py``)
    mmstar.py    MMStar: lmms-eval's MMStar task (``exact_match`` for one answer, ``mmstar_aggregate_results``
                 for the table), its prompt, and `load_mmstar`
    docvqa.py    ANLS: the official DocVQA / InfographicVQA script (also lmms-eval's ``anls``)
    boxes.py     boxes written as text (grounding, Vary-toy style): 0-1000 normalisation, strict and lenient
                 parsing, IoU, Acc@0.5 and mean IoU
    scoring.py   which metric scores which subset

The metrics are pure Python: no torch, no numpy. Running a model over questions comes after them:

    records.py   EvalRecord (one answered question) and EvalResult (tables, JSON)
    loop.py      `evaluate`, `image_gain` (the same questions with blank images), `with_other_images`
    gallery.py   `error_gallery`, `compare_before_after`
    cli.py       `python -m vlm_course eval ...`

Everything is importable from here (`from vlm_course.evaluation import vqa_accuracy, evaluate`).
"""

from .boxes import (
    BOX_SCALE,
    Box,
    accuracy_at_iou,
    box_accuracy,
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
from .cli import build_eval_parser, eval_main
from .docvqa import anls, levenshtein
from .gallery import compare_before_after, error_gallery
from .loop import (
    ANSWER_MARGIN,
    MIN_NEW_TOKENS,
    ImageGain,
    answer_budget,
    blank_fill,
    blank_like,
    evaluate,
    image_gain,
    with_other_images,
)
from .mmstar import (
    _LETTER_PREFIXES,
    MMSTAR_POST_PROMPT,
    MMSTAR_REQUIRED_FIELDS,
    extract_choice_letter,
    load_mmstar,
    mmstar_category_scores,
    mmstar_macro_average,
    mmstar_match,
    mmstar_prompt,
)
from .records import EvalRecord, EvalResult
from .scoring import CORRECT_THRESHOLD, METRICS, SUBSET_METRICS, exact_answer_match, metric_for, score_answer
from .vqa import (
    _ARTICLES,
    _CONTRACTIONS,
    _NUMBER_WORDS,
    _PUNCTUATION,
    _process_digit_article,
    _process_punctuation,
    normalize_answer,
    vqa_accuracy,
)

__all__ = [
    "accuracy_at_iou", "box_ious", "check_box", "denormalize_box", "format_box", "mean_iou", "normalize_box", "read_box",
    "ANSWER_MARGIN", "BOX_SCALE", "Box", "CORRECT_THRESHOLD", "EvalRecord", "EvalResult", "ImageGain", "METRICS",
    "MIN_NEW_TOKENS", "MMSTAR_POST_PROMPT", "MMSTAR_REQUIRED_FIELDS", "SUBSET_METRICS", "anls", "answer_budget",
    "blank_fill", "blank_like", "box_accuracy", "box_iou", "build_eval_parser", "compare_before_after",
    "error_gallery", "eval_main", "evaluate", "exact_answer_match", "extract_choice_letter", "image_gain",
    "levenshtein", "load_mmstar", "metric_for", "mmstar_category_scores", "mmstar_macro_average", "mmstar_match",
    "mmstar_prompt", "normalize_answer", "parse_box", "score_answer", "vqa_accuracy", "with_other_images",
    # the official tables and steps, read by lesson 06 and its graded exercises
    "_ARTICLES", "_CONTRACTIONS", "_LETTER_PREFIXES", "_NUMBER_WORDS", "_PUNCTUATION", "_process_digit_article",
    "_process_punctuation",
]
