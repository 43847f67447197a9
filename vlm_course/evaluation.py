"""Evaluation: the metrics that VLM papers report, written out so that you can read them.

Every metric here reproduces a reference scorer, quirks included, so that a number computed with the
course matches the number a paper or leaderboard would report for the same predictions:

- VQA accuracy: the official VQAv2 evaluator (GT-Vision-Lab/VQA, ``vqaEval.py``).
- MMStar: lmms-eval's MMStar task (``lmms_eval/tasks/mmstar/utils.py``): ``exact_match`` for one
  answer, ``mmstar_aggregate_results`` for the table.
- ANLS: the official DocVQA / InfographicVQA script (also lmms-eval's ``anls``).
- Boxes written as text (grounding, Vary-toy style): IoU between a parsed box and the gold box.

The metrics are pure Python: no torch, no numpy.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
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
