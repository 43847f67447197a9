"""Evaluation: the metrics that VLM papers report, written out so that you can read them.

Every metric here reproduces a reference scorer, quirks included, so that a number computed with the
course matches the number a paper or leaderboard would report for the same predictions:

- VQA accuracy: the official VQAv2 evaluator (GT-Vision-Lab/VQA, ``vqaEval.py``).
- MMStar: lmms-eval's MMStar task (``lmms_eval/tasks/mmstar/utils.py``): ``exact_match`` for one
  answer, ``mmstar_aggregate_results`` for the table.
- ANLS: the official DocVQA / InfographicVQA script (also lmms-eval's ``anls``).
- Boxes written as text (grounding, Vary-toy style): IoU between a parsed box and the gold box.

The metrics are pure Python: no torch, no numpy. The eval loops at the end (`evaluate`, `image_gain`,
`error_gallery`, `compare_before_after`, `eval_main`) import the model, tqdm and matplotlib only when called.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import itertools
import json
import os
import re
import sys
import textwrap
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------------------
# VQA accuracy (VQAv2 official evaluator)
# ---------------------------------------------------------------------------------------------------------

# The official contractions table, entry for entry. It has a few oddities that we keep on purpose, because
# scores must match the official ones: keys with capitals ("Im", "Ive") never match (answers are lower-cased
# first), and "somebody'd" maps to "somebodyd".
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
# Only zero to ten are spelled out in the official map ("eleven" stays a word).
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# Note what is *not* here: the period (handled by _PERIOD_STRIP), the apostrophe (contractions need it),
# the colon, and the percent sign (both survive normalisation in the official evaluator).
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!"]
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")  # a comma between digits: "1,000"
# The official pattern begins with "(?!<=\d)", a typo for the look-behind "(?<!\d)". As written it is a
# look-ahead that always succeeds, so the rule really is "drop every period that is not followed by a digit":
# "3.14" and ".5" keep theirs, "dogs." and "e.g." lose theirs.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official code calls periodStrip.sub("", text, re.UNICODE): re.UNICODE (= 32) lands in the `count`
# argument, so at most 32 periods are removed. We keep that so long outputs score exactly as officially.
_OFFICIAL_PERIOD_COUNT = 32


def _process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: drop or space out punctuation, then drop periods that end words."""
    has_number_comma = _COMMA_STRIP.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        # Decided on the original text: a mark next to a space ("yes, it is") is simply deleted, a mark inside
        # a word ("x-ray") becomes a space. When the answer holds a number with a comma, every mark is deleted,
        # which is what turns "1,000" into "1000".
        if mark + " " in text or " " + mark in text or has_number_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def _process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lower-case, number words to digits, drop articles, restore contractions."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    words = [_CONTRACTIONS.get(word, word) for word in words]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """Normalise a short answer the way the official VQAv2 evaluator does.

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    >>> normalize_answer("The answer is 1,000!")
    'answer is 1000'
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer expects a string, got {type(text).__name__}: {text!r}")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def _as_answer_list(answers: str | Sequence[str], metric: str) -> list[str]:
    """Accept one gold answer as a plain string; refuse empty lists and non-strings with a useful message."""
    if isinstance(answers, str):
        return [answers]
    answers = list(answers)
    if not answers:
        raise ValueError(f"{metric}: the list of gold answers is empty; pass at least one answer string.")
    for answer in answers:
        if not isinstance(answer, str):
            raise TypeError(f"{metric}: gold answers must be strings, got {type(answer).__name__}: {answer!r}")
    return answers


def vqa_accuracy(prediction: str, answers: str | Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers.

    With the usual 10 answers this is the official score: for each of the 10 ways of leaving one annotator
    out, min(#remaining annotators who gave the prediction / 3, 1), averaged. So 1 matching human -> 0.3,
    2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0.

    With a single answer (most the_cauldron rows) leave-one-out would always give 0, so it is exact match
    after normalisation. Any other number n >= 2 of answers uses the same leave-one-out formula over n
    subsets of n - 1 answers (e.g. 5 answers of which 3 match -> (3 * 2/3 + 2 * 1) / 5 = 0.8).

    Both sides are normalised with `normalize_answer`. (The official script only punctuation-processes
    the gold side, because VQAv2's annotation files already hold normalised answers; normalising both
    sides gives the same scores on them and also works for raw gold answers.)
    """
    gold = [normalize_answer(answer) for answer in _as_answer_list(answers, "vqa_accuracy")]
    predicted = normalize_answer(prediction)
    if len(gold) == 1:
        return float(predicted == gold[0])
    scores = []
    for left_out in range(len(gold)):
        matches = sum(answer == predicted for i, answer in enumerate(gold) if i != left_out)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


# ---------------------------------------------------------------------------------------------------------
# Multiple choice: MMStar as scored by lmms-eval
# ---------------------------------------------------------------------------------------------------------

# Where lmms-eval looks for the letter in a lower-cased, stripped answer: right after one of these prefixes,
# or else as the very first character.
_LETTER_PREFIXES = ("(", "option ", "the answer is ")


def _clean_choice_text(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string, got {type(text).__name__}: {text!r}")
    return text.lower().strip().replace("\n", " ")


def _candidate_letters(cleaned: str) -> list[str]:
    """The characters lmms-eval would compare with the gold letter, most specific rule first."""
    candidates = [cleaned[len(prefix)] for prefix in _LETTER_PREFIXES
                  if cleaned.startswith(prefix) and len(cleaned) > len(prefix)]
    if cleaned:
        candidates.append(cleaned[0])
    return candidates


def mmstar_match(prediction: str, letter: str) -> float:
    """1.0 when lmms-eval's MMStar `exact_match` accepts `prediction` for the gold `letter`, else 0.0.

    The rule is deliberately simple and literal: lower-case and strip the prediction, then accept the
    letter if it is the first character, or follows "(", "option " or "the answer is " at the start.
    So "B. cat", "(b)", "Option B" and "The answer is B." count for B; "Answer: B" and "I think B" do not;
    an empty answer scores 0. Beware of the first-character rule: "cat" counts as answer C, and "an apple"
    and even "Answer: B" as answer A. That is how published MMStar numbers are computed, so we keep it.
    """
    gold = _clean_choice_text(letter, "the gold letter")
    return float(gold in _candidate_letters(_clean_choice_text(prediction, "the prediction")))


def extract_choice_letter(prediction: str, letters: str = "ABCD") -> str | None:
    """The option letter that MMStar's scoring rule reads in `prediction` (upper-case), or None.

    Uses the same positions as `mmstar_match`, so for a gold letter in "ABCD",
    ``mmstar_match(p, g) == float(extract_choice_letter(p) == g)``. Useful for eval tables and error
    galleries ("what did the model pick?"). When several rules apply ("option b" starts with "o"), the
    prefix rule wins; that only matters if `letters` contains O or T.
    """
    allowed = {letter.lower() for letter in letters}
    for candidate in _candidate_letters(_clean_choice_text(prediction, "the prediction")):
        if candidate in allowed:
            return candidate.upper()
    return None


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _l2_category_means(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    scores_by_l2: dict[str, list[float]] = defaultdict(list)
    for i, record in enumerate(records):
        try:
            scores_by_l2[record["l2_category"]].append(float(record["score"]))
        except KeyError as missing:
            raise KeyError(f"MMStar record {i} has no {missing} field; each record needs 'l2_category' and "
                           f"'score' (and 'category' for per-category scores): {record!r}") from None
    if not scores_by_l2:
        raise ValueError("No MMStar records to average: score at least one question first.")
    return {l2: _mean(scores) for l2, scores in scores_by_l2.items()}


def mmstar_macro_average(records: Iterable[dict[str, Any]]) -> float:
    """MMStar's headline score: mean score per sub-axis (`l2_category`), then the mean over sub-axes.

    Each record is a dict with at least ``l2_category`` and ``score`` (0/1 from `mmstar_match`). This is
    lmms-eval's `mmstar_aggregate_results`: every sub-axis weighs the same however many questions it has
    (a macro average), unlike the plain fraction of correct answers (micro average).
    """
    return _mean(list(_l2_category_means(records).values()))


def mmstar_category_scores(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    """The full MMStar table as lmms-eval reports it: one macro average per core `category` (over its
    sub-axes), and ``"average"`` over all sub-axes. Records need ``category``, ``l2_category`` and ``score``."""
    records = list(records)
    by_category: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i, record in enumerate(records):
        if "category" not in record:
            raise KeyError(f"MMStar record {i} has no 'category' field (needed for per-category scores): "
                           f"{record!r}")
        by_category[record["category"]].append(record)
    table = {category: mmstar_macro_average(group) for category, group in by_category.items()}
    table["average"] = mmstar_macro_average(records)
    return table


# ---------------------------------------------------------------------------------------------------------
# ANLS (DocVQA)
# ---------------------------------------------------------------------------------------------------------

def levenshtein(a: str, b: str) -> int:
    """Edit distance: the fewest single-character insertions, deletions and substitutions from a to b.

    Dynamic programming, one row at a time: ``previous[j]`` is the distance between the first i - 1
    characters of a and the first j characters of b.
    """
    previous = list(range(len(b) + 1))  # from "" to b[:j] takes j insertions
    for i, char_a in enumerate(a, start=1):
        current = [i]  # from a[:i] to "" takes i deletions
        for j, char_b in enumerate(b, start=1):
            current.append(min(
                previous[j] + 1,                         # delete char_a
                current[j - 1] + 1,                      # insert char_b
                previous[j - 1] + (char_a != char_b),    # substitute (free if equal)
            ))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: str | Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity for one question (DocVQA's metric).

    For each gold answer: distance = edit distance / length of the longer string, after lower-casing and
    collapsing whitespace; the score is 1 - the smallest distance, or 0 when that is below `threshold`.
    So one wrong character in a 10-character answer gives 0.9, and an answer more than half wrong gives 0.

    Two details follow the official script so that numbers match: the score is kept when it equals the
    threshold exactly (a distance of exactly 0.5 scores 0.5), and the length divided by is that of the raw
    strings, before whitespace clean-up. Average this over questions for the dataset's ANLS.
    """
    if not isinstance(prediction, str):
        raise TypeError(f"anls: the prediction must be a string, got {type(prediction).__name__}")
    predicted = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in _as_answer_list(answers, "anls"):
        gold = " ".join(answer.strip().lower().split())
        # .upper() as in the official script: it changes the length of a few characters ("ß" -> "SS").
        length = max(len(answer.upper()), len(prediction.upper()))
        distances.append(0.0 if length == 0 else levenshtein(gold, predicted) / length)
    similarity = 1.0 - min(distances)
    return similarity if similarity >= threshold else 0.0


# ---------------------------------------------------------------------------------------------------------
# Boxes written as text (grounding)
# ---------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------
# MMStar data
# ---------------------------------------------------------------------------------------------------------

MMSTAR_REQUIRED_FIELDS = ("index", "question", "image", "answer", "category", "l2_category")
_DATA_SUFFIXES = (".parquet", ".jsonl")


def _hub_is_off() -> bool:
    return any(os.environ.get(flag, "").upper() in {"1", "ON", "YES", "TRUE"}
               for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _how_to_get_mmstar(name: str, split: str) -> str:
    return ("On a machine with network, save it once with\n"
            f"    python -c \"import datasets; datasets.load_dataset('{name}', split='{split}')"
            f".to_parquet('mmstar_{split}.parquet')\"\n"
            f"then copy the file here and call load_mmstar('mmstar_{split}.parquet').")


def load_mmstar(path_or_name: str | os.PathLike = "Lin-Chen/MMStar", split: str = "val",
                limit: int | None = None) -> list[dict[str, Any]]:
    """MMStar rows as dicts: index, question, image (an RGB PIL image), answer, category, l2_category, meta_info.

    `path_or_name` is either a local file (.parquet in the hub's schema, or .jsonl whose `image` is a file
    path relative to the .jsonl or base64-encoded bytes), a local folder holding such files (files whose
    name starts with `split` are preferred), or a Hugging Face dataset name, loaded with
    `datasets.load_dataset` when the hub is reachable. `limit` keeps the first rows only.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative integer, got {limit!r}")
    name = str(path_or_name)
    local = Path(name).expanduser()
    if local.exists():
        return [_mmstar_row(row, base_dir, i) for i, (row, base_dir) in enumerate(_read_local(local, split, limit))]
    # Hub names are "owner/name"; anything else that looks like a path is a missing local file.
    if local.suffix in _DATA_SUFFIXES or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"No MMStar file or folder at {str(local)!r}. Check the path, or get the data: "
                                + _how_to_get_mmstar("Lin-Chen/MMStar", split))
    return [_mmstar_row(row, None, i) for i, row in enumerate(_load_from_hub(name, split, limit))]


def _load_from_hub(name: str, split: str, limit: int | None) -> list[dict[str, Any]]:
    if _hub_is_off():
        raise RuntimeError(f"{name!r} is not a local file or folder, and the Hugging Face hub is switched off "
                           "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE). " + _how_to_get_mmstar(name, split))
    import datasets  # imported here: the metrics above must not pay for it

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # no network, wrong name, wrong split, no access ...
        raise RuntimeError(f"Could not load {name!r} (split {split!r}) from the Hugging Face hub: {error}\n"
                           + _how_to_get_mmstar(name, split)) from error
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return list(dataset)


def _data_files(folder: Path, split: str) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix in _DATA_SUFFIXES)
    for_split = [p for p in files if p.name.startswith(split)]
    chosen = for_split or files
    if not chosen:
        raise FileNotFoundError(f"The folder {str(folder)!r} holds no .parquet or .jsonl file for MMStar. "
                                + _how_to_get_mmstar("Lin-Chen/MMStar", split))
    return chosen


def _read_local(path: Path, split: str, limit: int | None) -> list[tuple[dict[str, Any], Path]]:
    """(row, folder its relative image paths start from) pairs, at most `limit` of them."""
    files = _data_files(path, split) if path.is_dir() else [path]
    rows: list[tuple[dict[str, Any], Path]] = []
    for file in files:
        if limit is not None and len(rows) >= limit:
            break
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            file_rows = pq.read_table(file).to_pylist()
        elif file.suffix == ".jsonl":
            with open(file, encoding="utf-8") as handle:
                file_rows = [json.loads(line) for line in handle if line.strip()]
        else:
            raise ValueError(f"Cannot read {str(file)!r}: MMStar files must be .parquet or .jsonl.")
        rows.extend((row, file.parent) for row in file_rows)
    return rows[:limit] if limit is not None else rows


def _mmstar_row(row: dict[str, Any], base_dir: Path | None, position: int) -> dict[str, Any]:
    missing = [field for field in MMSTAR_REQUIRED_FIELDS if field not in row]
    if missing:
        raise ValueError(f"MMStar row {position} lacks the fields {missing}; found {sorted(row)}. "
                         f"MMStar rows need {list(MMSTAR_REQUIRED_FIELDS)} (and optionally meta_info).")
    out = dict(row)
    out.setdefault("meta_info", None)
    out["image"] = _decode_image(row["image"], base_dir, row["index"])
    return out


def _decode_image(value: Any, base_dir: Path | None, index: Any):
    """A PIL RGB image from what datasets, parquet or jsonl hold: a PIL image, {"bytes", "path"}, bytes,
    a file path (relative to the data file) or a base64 string (as in MMStar.tsv)."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict):  # the hub's parquet encoding of an Image feature
            value = value.get("bytes") or value.get("path")
        if isinstance(value, str):
            file = Path(value) if base_dir is None else base_dir / value
            # os.path.isfile, not Path.is_file: a long base64 string is "a file name too long" for the latter
            value = file.read_bytes() if os.path.isfile(file) else base64.b64decode(value, validate=True)
        if isinstance(value, (bytes, bytearray)):
            with Image.open(io.BytesIO(value)) as image:
                return image.convert("RGB")
    except (OSError, UnidentifiedImageError, binascii.Error, ValueError) as error:
        raise ValueError(f"MMStar row with index {index}: its image cannot be decoded ({error}). Images must "
                         "be PNG/JPEG bytes, a path relative to the data file, or base64 text.") from error
    raise ValueError(f"MMStar row with index {index}: unsupported image value of type {type(value).__name__}; "
                     "expected PNG/JPEG bytes, a path relative to the data file, or base64 text.")


# --- eval loops (added later) ---
# Everything below runs a model over questions, scores its answers with the metrics above, and reports:
# a table per subset, an error gallery, the gain from the image, and a before/after comparison.

# ---------------------------------------------------------------------------------------------------------
# Which metric scores which question
# ---------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------
# Questions in, records out
# ---------------------------------------------------------------------------------------------------------

MMSTAR_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly"
_MMSTAR_YES_NO = " Please answer yes or no."  # lmms-eval deletes it whenever it adds its own prompt


def mmstar_prompt(question: str) -> str:
    """An MMStar question as lmms-eval's default `mmstar` task asks it.

    MMStar's `question` field already lists the options ("...\\nOptions: A: ..., B: ..."); lmms-eval strips
    it, drops " Please answer yes or no." and appends its post-prompt.
    """
    return question.strip().replace(_MMSTAR_YES_NO, "") + MMSTAR_POST_PROMPT


@dataclass
class _Question:
    subset: str
    question: str
    answers: list[str]
    images: list
    extra: dict


def _subset_of(row: dict[str, Any]) -> str:
    """The subset name: the loader's row["source"], else the turn's source without the "synthetic-" prefix."""
    source = row.get("source") or row["texts"][0].get("source") or "unknown"
    return source.removeprefix("synthetic-")


def _question_from_row(row: dict[str, Any], position: int) -> _Question:
    """The first turn of a the_cauldron-style row, or an MMStar row (as `load_mmstar` returns it)."""
    if "texts" not in row and {"question", "answer", "image"} <= set(row):
        extra = {key: row[key] for key in ("index", "category", "l2_category") if key in row}
        return _Question("mmstar", mmstar_prompt(row["question"]), [row["answer"]], [row["image"]], extra)
    texts = row.get("texts")
    if not texts or not isinstance(texts[0], dict) or "user" not in texts[0] or "assistant" not in texts[0]:
        raise ValueError(f"row {position} has no first turn {{'user': ..., 'assistant': ...}} in 'texts': rows must be "
                         "in the_cauldron's schema (or MMStar's: question, answer, image)")
    first = texts[0]
    # A row may carry several human answers (VQAv2 style); the_cauldron rows have one, the assistant's.
    answers = list(row.get("answers") or [first["assistant"]])
    images = row.get("images") or []
    return _Question(_subset_of(row), first["user"], answers, list(images), {})


@dataclass
class EvalRecord:
    """One question as evaluated: what was asked, what the model answered, and how that scored."""

    subset: str
    question: str
    answers: list[str]
    prediction: str
    metric: str
    score: float
    exact: float  # normalised exact match, reported next to the metric
    image: Any = None  # the first image the model saw (PIL); not written to JSON
    extra: dict = field(default_factory=dict)  # MMStar's index, category and l2_category

    @property
    def correct(self) -> bool:
        return self.score >= CORRECT_THRESHOLD

    def to_dict(self) -> dict[str, Any]:
        return {"subset": self.subset, "question": self.question, "answers": self.answers,
                "prediction": self.prediction, "metric": self.metric, "score": self.score, "exact": self.exact,
                "extra": self.extra}


def _record(question: _Question, prediction: str, image_seen) -> EvalRecord:
    return EvalRecord(
        subset=question.subset, question=question.question, answers=question.answers, prediction=prediction,
        metric=metric_for(question.subset), score=score_answer(question.subset, prediction, question.answers),
        exact=exact_answer_match(question.subset, prediction, question.answers), image=image_seen, extra=question.extra,
    )


def _aggregate(records: Sequence[EvalRecord], key: str) -> float:
    """Mean of `key` over records; for MMStar records, MMStar's macro average over its sub-axes."""
    if all("l2_category" in record.extra for record in records):
        return mmstar_macro_average({"l2_category": record.extra["l2_category"], "score": getattr(record, key)}
                                    for record in records)
    return _mean([getattr(record, key) for record in records])


# ---------------------------------------------------------------------------------------------------------
# EvalResult: the records plus tables and files
# ---------------------------------------------------------------------------------------------------------

@dataclass
class EvalResult:
    """Records of one evaluation run, with per-subset scores, a table and JSON output.

    `overall` is the mean of the per-subset scores, so every subset weighs the same however many
    questions it has (MMStar averages its sub-axes the same way).
    """

    records: list[EvalRecord]
    meta: dict = field(default_factory=dict)

    @property
    def subsets(self) -> list[str]:
        return list(dict.fromkeys(record.subset for record in self.records))  # in order of appearance

    def records_of(self, subset: str) -> list[EvalRecord]:
        return [record for record in self.records if record.subset == subset]

    @property
    def by_subset(self) -> dict[str, float]:
        return {subset: _aggregate(self.records_of(subset), "score") for subset in self.subsets}

    @property
    def overall(self) -> float:
        return _mean(list(self.by_subset.values()))

    def mmstar_scores(self) -> dict[str, float] | None:
        """MMStar's per-category table (lmms-eval's numbers) when the run holds MMStar questions."""
        records = [record for record in self.records if {"category", "l2_category"} <= set(record.extra)]
        if not records:
            return None
        return mmstar_category_scores({**record.extra, "score": record.score} for record in records)

    def table(self) -> list[dict[str, Any]]:
        """One dict per subset (subset, metric, n, score, exact), then the overall row."""
        rows = []
        for subset in self.subsets:
            records = self.records_of(subset)
            rows.append({"subset": subset, "metric": records[0].metric, "n": len(records),
                         "score": _aggregate(records, "score"), "exact": _aggregate(records, "exact")})
        rows.append({"subset": "overall", "metric": "mean of subsets", "n": len(self.records),
                     "score": self.overall, "exact": _mean([row["exact"] for row in rows])})
        return rows

    def format_table(self) -> str:
        lines = [f"{'subset':<14}{'metric':<17}{'n':>6}{'score':>8}{'exact':>8}"]
        for row in self.table():
            lines.append(f"{row['subset']:<14}{row['metric']:<17}{row['n']:>6}{row['score']:>8.3f}{row['exact']:>8.3f}")
        categories = self.mmstar_scores()
        if categories:
            lines.append("")
            lines.append("MMStar (macro average over sub-axes, as lmms-eval reports it)")
            lines += [f"  {name:<28}{score:>8.3f}" for name, score in categories.items()]
        return "\n".join(lines)

    __str__ = format_table

    def to_dict(self) -> dict[str, Any]:
        summary = {"overall": self.overall, "by_subset": self.by_subset, "n": len(self.records)}
        if self.mmstar_scores():
            summary["mmstar"] = self.mmstar_scores()
        return {"summary": summary, "table": self.table(), "meta": self.meta,
                "records": [record.to_dict() for record in self.records]}

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write summary, table, meta and every record (without images), atomically."""
        return _write_text_atomically(Path(path), json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> EvalResult:
        """Read a result written by `to_json` (images are not saved, so records come back without them)."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        fields = ("subset", "question", "answers", "prediction", "metric", "score", "exact", "extra")
        return cls([EvalRecord(**{key: record[key] for key in fields}) for record in data["records"]],
                   data.get("meta", {}))


def _write_text_atomically(path: Path, text: str) -> Path:
    """Write to a temporary file next to `path`, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# The eval loop
# ---------------------------------------------------------------------------------------------------------

def blank_fill(processor) -> tuple[int, int, int]:
    """The colour of a blank image: the processor's normalisation mean, which normalises to (about) zero.

    So the "no image" input is the most neutral one the vision encoder can get, not a black or white one.
    """
    vision = getattr(getattr(processor, "config", None), "vision", None)
    mean = getattr(vision, "image_mean", (0.5, 0.5, 0.5))
    return tuple(round(255 * channel) for channel in mean)


def blank_like(image, fill: tuple[int, int, int] = (128, 128, 128)):
    """An RGB image of the same size as `image`, every pixel `fill`."""
    from PIL import Image

    return Image.new("RGB", image.size, fill)


def _gallery_copy(image, fill):
    """What the record keeps of a blank image: a small one (a full-size copy per question would waste memory)."""
    from PIL import Image

    scale = min(1.0, 128 / max(image.size))
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    return Image.new("RGB", size, fill)


MIN_NEW_TOKENS = 16
ANSWER_MARGIN = 8  # tokens allowed beyond the longest gold answer


def answer_budget(processor, rows: Iterable[dict[str, Any]]) -> int:
    """How many new tokens to generate: the longest gold answer plus a margin, and at least 16.

    One number for the whole run, as benchmark harnesses set one per task. A fixed 16 would silently cut
    the boxes of the grounding subset ("[441, 671, 718, 948]" is 20 SmolLM2 tokens) and score them 0.
    """
    return _budget(processor, [_question_from_row(row, position) for position, row in enumerate(rows)])


def _budget(processor, questions: Sequence[_Question]) -> int:
    return max(MIN_NEW_TOKENS, _longest_answer(processor, questions) + ANSWER_MARGIN)


def _longest_answer(processor, questions: Sequence[_Question]) -> int:
    return max((len(processor.text_ids(answer)) for q in questions for answer in q.answers), default=0)


def _warn_if_answers_are_cut(processor, questions: Sequence[_Question], max_new_tokens: int) -> None:
    import warnings

    longest = _longest_answer(processor, questions)
    if longest >= max_new_tokens:  # the answer plus its end-of-turn token does not fit
        warnings.warn(f"max_new_tokens={max_new_tokens} is too short for the longest gold answer ({longest} tokens "
                      "plus the end of turn): right answers will be cut and scored wrong. Leave max_new_tokens "
                      f"unset to use answer_budget(), here {longest + ANSWER_MARGIN}.", stacklevel=3)


def evaluate(model, processor, rows: Iterable[dict[str, Any]], batch_size: int = 8,
             max_new_tokens: int | None = None, blank_image: bool = False, progress: bool = True,
             desc: str | None = None) -> EvalResult:
    """Answer the first question of every row with greedy batched generation and score each answer.

    `rows` are the_cauldron-style rows ({"images", "texts", "source"}) or MMStar rows (`load_mmstar`).
    `max_new_tokens` defaults to `answer_budget` (at least 16, more when the gold answers are long).
    With `blank_image=True` every image is replaced by a blank one of the same size (see `blank_fill`):
    the score the model gets without looking. The model is put in eval mode and given back as it was.
    """
    from tqdm.auto import tqdm  # renders as a widget in notebooks, as text in a terminal

    from .vlm import answer

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    questions = [_question_from_row(row, position) for position, row in enumerate(rows)]
    if not questions:
        raise ValueError("evaluate got no rows: load some data first (e.g. load_mini_cauldron('test'))")
    if max_new_tokens is None:
        max_new_tokens = _budget(processor, questions)
    else:
        _warn_if_answers_are_cut(processor, questions, max_new_tokens)
    fill = blank_fill(processor)
    records: list[EvalRecord] = []
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(questions), desc=desc or ("eval, blank images" if blank_image else "eval"),
                  unit="q", disable=not progress) as bar:
            for start in range(0, len(questions), batch_size):
                batch = questions[start:start + batch_size]
                images = [[blank_like(image, fill) for image in q.images] if blank_image else q.images for q in batch]
                predictions = answer(model, processor, images, [q.question for q in batch],
                                     max_new_tokens=max_new_tokens)
                for question, prediction in zip(batch, predictions):
                    seen = question.images[0] if question.images else None
                    if blank_image and seen is not None:
                        seen = _gallery_copy(seen, fill)
                    records.append(_record(question, prediction, seen))
                bar.update(len(batch))
    finally:
        model.train(was_training)
    meta = {"blank_image": blank_image, "max_new_tokens": max_new_tokens, "batch_size": batch_size}
    return EvalResult(records, meta)


# ---------------------------------------------------------------------------------------------------------
# Gain from the image (MMStar's multi-modal gain)
# ---------------------------------------------------------------------------------------------------------

@dataclass
class ImageGain:
    """The same questions with the real image and with a blank one; gain = with - without.

    MMStar's multi-modal gain runs the model without its image; our model always expects one, so a blank
    image stands in for "no image". A gain near zero means the answers come from the text alone.
    """

    with_image: EvalResult
    without_image: EvalResult

    @property
    def by_subset(self) -> dict[str, float]:
        without = self.without_image.by_subset
        return {subset: score - without[subset] for subset, score in self.with_image.by_subset.items()}

    @property
    def overall(self) -> float:
        return self.with_image.overall - self.without_image.overall

    def table(self) -> list[dict[str, Any]]:
        with_image, without = self.with_image.by_subset, self.without_image.by_subset
        rows = [{"subset": subset, "n": len(self.with_image.records_of(subset)), "with_image": with_image[subset],
                 "blank_image": without[subset], "gain": with_image[subset] - without[subset]}
                for subset in self.with_image.subsets]
        rows.append({"subset": "overall", "n": len(self.with_image.records), "with_image": self.with_image.overall,
                     "blank_image": self.without_image.overall, "gain": self.overall})
        return rows

    def format_table(self) -> str:
        lines = [f"{'subset':<14}{'n':>6}{'image':>8}{'blank':>8}{'gain':>8}"]
        lines += [f"{row['subset']:<14}{row['n']:>6}{row['with_image']:>8.3f}{row['blank_image']:>8.3f}"
                  f"{row['gain']:>+8.3f}" for row in self.table()]
        return "\n".join(lines)

    __str__ = format_table

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table(), "with_image": self.with_image.to_dict(),
                "blank_image": self.without_image.to_dict()}


def image_gain(model, processor, rows: Iterable[dict[str, Any]], batch_size: int = 8,
               max_new_tokens: int | None = None, progress: bool = True) -> ImageGain:
    """Evaluate the same rows twice, with their images and with blank ones, and report the difference."""
    rows = list(rows)  # read twice
    options = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "progress": progress}
    return ImageGain(evaluate(model, processor, rows, blank_image=False, **options),
                     evaluate(model, processor, rows, blank_image=True, **options))


# ---------------------------------------------------------------------------------------------------------
# Error gallery and before/after
# ---------------------------------------------------------------------------------------------------------

def _gallery_records(records: Sequence[EvalRecord], n: int, only_errors: bool) -> list[EvalRecord]:
    """Up to n records, taking subsets in turn so that one large subset does not fill the gallery."""
    groups: dict[str, list[EvalRecord]] = defaultdict(list)
    for record in records:
        if not (only_errors and record.correct):
            groups[record.subset].append(record)
    in_turn = itertools.chain.from_iterable(itertools.zip_longest(*groups.values()))
    return [record for record in in_turn if record is not None][:n]


def _shorten(text: str, width: int, max_lines: int) -> str:
    return "\n".join(textwrap.wrap(" ".join(text.split()), width, max_lines=max_lines, placeholder=" ...")) or "''"


def _draw_record(ax, record: EvalRecord) -> None:
    colour = "tab:green" if record.correct else "tab:red"
    if record.image is not None:
        ax.imshow(record.image)
    else:
        ax.text(0.5, 0.5, "(image not saved)", ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(3)
    ax.set_title(f"{record.subset} · {record.metric} {record.score:.2f}", color=colour, fontsize=9)
    caption = (f"Q: {_shorten(record.question, 34, 3)}\n"
               f"model: {_shorten(repr(record.prediction), 30, 2)}\n"
               f"answer: {_shorten(' | '.join(record.answers), 30, 1)}")
    ax.set_xlabel(caption, fontsize=7, loc="left", color=colour)


def error_gallery(result: EvalResult, n: int = 12, only_errors: bool = True, ncols: int = 4):
    """A matplotlib Figure: one panel per answer (image, question, prediction, gold), red wrong, green right.

    With `only_errors` only wrong answers (score below CORRECT_THRESHOLD) are shown. Subsets take turns,
    so a gallery of 12 covers every subset. Returns the Figure (not shown, not kept by pyplot): display it
    in a notebook or `fig.savefig("gallery.png")`.
    """
    from matplotlib.figure import Figure  # a bare Figure: no pyplot state, no window, nothing to close

    chosen = _gallery_records(result.records, n, only_errors)
    if not chosen:
        figure = Figure(figsize=(4, 1.2))
        ax = figure.add_subplot()
        ax.axis("off")
        what = "errors" if only_errors else "answers"
        ax.text(0.5, 0.5, f"No {what} to show among {len(result.records)} answers", ha="center", va="center")
        return figure
    ncols = min(ncols, len(chosen))
    nrows = -(-len(chosen) // ncols)
    figure = Figure(figsize=(2.8 * ncols, 3.9 * nrows), layout="constrained")
    for i, record in enumerate(chosen):
        _draw_record(figure.add_subplot(nrows, ncols, i + 1), record)
    return figure


def _per_question_changes(before: EvalResult, after: EvalResult) -> str | None:
    """ "fixed / broken" counts when both runs asked the same questions in the same order."""
    same_questions = len(before.records) == len(after.records) and all(
        (b.subset, b.question) == (a.subset, a.question) for b, a in zip(before.records, after.records))
    if not same_questions:
        return None
    fixed = sum(a.correct and not b.correct for b, a in zip(before.records, after.records))
    broken = sum(b.correct and not a.correct for b, a in zip(before.records, after.records))
    return f"per question: {fixed} fixed, {broken} broken, {len(after.records) - fixed - broken} unchanged"


def compare_before_after(before: EvalResult, after: EvalResult, names: tuple[str, str] = ("before", "after")) -> str:
    """A table of per-subset scores of two runs (e.g. before and after training) and their change."""
    def cell(scores: dict[str, float], subset: str) -> str:
        return f"{scores[subset]:>8.3f}" if subset in scores else f"{'-':>8}"

    old, new = before.by_subset, after.by_subset
    lines = [f"{'subset':<14}{names[0]:>8}{names[1]:>8}{'change':>8}"]
    for subset in dict.fromkeys([*before.subsets, *after.subsets]):
        change = f"{new[subset] - old[subset]:>+8.3f}" if subset in old and subset in new else f"{'-':>8}"
        lines.append(f"{subset:<14}{cell(old, subset)}{cell(new, subset)}{change}")
    lines.append(f"{'overall':<14}{before.overall:>8.3f}{after.overall:>8.3f}{after.overall - before.overall:>+8.3f}")
    changes = _per_question_changes(before, after)
    if changes:
        lines.append(changes)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Command line: python -m vlm_course eval ...
# ---------------------------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vlm_course eval",
        description="Evaluate a model on mini-cauldron (or MMStar) and write results.json, table.txt and "
                    "gallery.png into --out.")
    parser.add_argument("--model", help="folder of a saved model (save_pretrained); default: the profile's "
                                        "model, with random weights where the profile has none")
    parser.add_argument("--profile", help="profile to build when no --model is given: tiny, smol or nano "
                                          "(default: $VLM_COURSE_PROFILE, else chosen by the hardware)")
    parser.add_argument("--split", help="mini-cauldron split (default test) or MMStar split (default val)")
    parser.add_argument("--subsets", help="comma-separated mini-cauldron subsets, e.g. shapes,count (default: all)")
    parser.add_argument("--limit", type=_positive_int, help="at most this many questions per subset "
                                                            "(with --mmstar: in total)")
    parser.add_argument("--mmstar", metavar="PATH", help="evaluate on MMStar instead: a local .parquet/.jsonl "
                                                         "file or folder (or 'Lin-Chen/MMStar' when online)")
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.add_argument("--max-new-tokens", type=_positive_int,
                        help="tokens generated per answer (default: the longest gold answer + 8, at least 16)")
    parser.add_argument("--image-gain", action="store_true",
                        help="also answer with blank images and report the gain from the image")
    parser.add_argument("--gallery", type=_positive_int, default=12, help="wrong answers shown in gallery.png")
    parser.add_argument("--out", default="runs/eval", help="output folder (default runs/eval)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights of an untrained model")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _load_eval_model(args: argparse.Namespace):
    """(model, processor, description) from --model or --profile."""
    import torch

    from .config import get_profile
    from .processing import VLMProcessor
    from .vlm import VisionLanguageModel

    if args.model:
        model, description = VisionLanguageModel.from_pretrained(args.model), f"model {args.model}"
    else:
        profile = get_profile(args.profile)
        torch.manual_seed(args.seed)  # the untrained parts are random: the same seed gives the same model
        model = VisionLanguageModel.from_profile(profile)
        description = f"profile {profile.name} (not trained on images)"
    from .weights import tokenizer_problem

    if tokenizer_problem(model.config.tokenizer):
        raise FileNotFoundError(tokenizer_problem(model.config.tokenizer))
    return model, VLMProcessor.from_config(model.config), description


def _load_eval_rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    if args.mmstar:
        split = args.split or "val"
        return load_mmstar(args.mmstar, split=split, limit=args.limit), f"MMStar {args.mmstar} ({split})"
    from .data.cauldron import load_mini_cauldron

    split = args.split or "test"
    subsets = [name.strip() for name in args.subsets.split(",") if name.strip()] if args.subsets else None
    rows = load_mini_cauldron(split, subsets=subsets, max_per_subset=args.limit, verbose=False,
                              min_image_size=getattr(args, "min_image_size", 1))
    return list(rows), f"mini-cauldron {split}"


def eval_main(argv: Sequence[str] | None = None) -> int:
    """`python -m vlm_course eval`: evaluate, write results.json, table.txt and gallery.png, print the table."""
    parser = build_eval_parser()
    args = parser.parse_args(argv)
    if args.mmstar and args.subsets:
        parser.error("--subsets chooses mini-cauldron subsets; MMStar has none (use --limit to evaluate fewer)")
    from .training import writable_folder_error
    from .weights import apply_offline_env

    apply_offline_env()
    out_problem = writable_folder_error(Path(args.out), "--out")  # before the evaluation, not after it
    if out_problem:
        print(f"eval: {out_problem}", file=sys.stderr)
        return 2
    try:
        model, processor, model_name = _load_eval_model(args)
        args.min_image_size = model.config.vision.patch_size  # smaller images: skipped and counted, not a crash
        rows, data_name = _load_eval_rows(args)
    except (FileNotFoundError, ValueError, RuntimeError) as error:  # a wrong path or name, or no network
        print(f"eval: {error}", file=sys.stderr)
        return 2
    options = {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "progress": not args.no_progress}
    result = evaluate(model, processor, rows, **options)
    result.meta.update(model=model_name, data=data_name)

    out = Path(args.out)
    result.to_json(out / "results.json")
    table = result.format_table()
    written = ["results.json", "table.txt", "gallery.png"]
    if args.image_gain:
        gain = ImageGain(result, evaluate(model, processor, rows, blank_image=True, **options))
        table += "\n\nGain from the image (real image minus blank image)\n" + gain.format_table()
        _write_text_atomically(out / "image_gain.json", json.dumps(gain.to_dict(), indent=2) + "\n")
        written.append("image_gain.json")
    _write_text_atomically(out / "table.txt", table + "\n")
    error_gallery(result, n=args.gallery).savefig(out / "gallery.png", dpi=100)

    print(table)
    print(f"{model_name} on {data_name}: overall {result.overall:.3f} (mean over {len(result.subsets)} subsets, "
          f"{len(result.records)} questions); wrote {', '.join(written)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(eval_main())
