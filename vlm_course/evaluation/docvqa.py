"""ANLS, the DocVQA / InfographicVQA metric (the official script, also lmms-eval's ``anls``).

One minus the normalised edit distance to the closest gold answer, counted as 0 below a threshold (0.5), so a
near-miss in reading text ("invoice 2O24") still earns most of the credit. Pure Python: no torch, no numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

from .vqa import _as_answer_list


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
