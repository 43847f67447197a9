"""Questions in, records out: one EvalRecord per answered question, and EvalResult, their tables and files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import write_text_atomically
from .mmstar import _mean, mmstar_category_scores, mmstar_macro_average, mmstar_prompt
from .scoring import CORRECT_THRESHOLD, exact_answer_match, metric_for, score_answer


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
        return write_text_atomically(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> EvalResult:
        """Read a result written by `to_json` (images are not saved, so records come back without them)."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        fields = ("subset", "question", "answers", "prediction", "metric", "score", "exact", "extra")
        return cls([EvalRecord(**{key: record[key] for key in fields}) for record in data["records"]],
                   data.get("meta", {}))
