"""MMStar as lmms-eval runs it (``lmms_eval/tasks/mmstar/utils.py``): the prompt, the letter match, the table.

``exact_match`` scores one answer (`mmstar_match`), ``mmstar_aggregate_results`` the table (macro averages
over sub-axes: `mmstar_macro_average`, `mmstar_category_scores`). `load_mmstar` reads the benchmark from a
local file or folder, or from the hub when online. Pure Python: no torch, no numpy.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

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


MMSTAR_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly"
_MMSTAR_YES_NO = " Please answer yes or no."  # lmms-eval deletes it whenever it adds its own prompt


def mmstar_prompt(question: str) -> str:
    """An MMStar question as lmms-eval's default `mmstar` task asks it.

    MMStar's `question` field already lists the options ("...\\nOptions: A: ..., B: ..."); lmms-eval strips
    it, drops " Please answer yes or no." and appends its post-prompt.
    """
    return question.strip().replace(_MMSTAR_YES_NO, "") + MMSTAR_POST_PROMPT


# ---------------------------------------------------------------------------------------------------------
# The benchmark's data: a local .parquet / .jsonl file or folder, or the hub

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
