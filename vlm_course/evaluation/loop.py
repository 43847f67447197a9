"""The eval loop: answer every row's first question with greedy batched generation, score each answer.

`image_gain` runs the same questions again with blank images (MMStar's multi-modal gain): a gain near zero
means the answers come from the text alone. Model, tqdm and PIL are imported only when called.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .records import EvalRecord, EvalResult, _Question, _question_from_row, _record, _subset_of


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

    from ..vlm import answer

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
# Another scene's image: is the answer read from the picture?
# ---------------------------------------------------------------------------------------------------------

def with_other_images(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same questions, each with another item's image: within a subset, item i gets the image of the next item
    that shows a different picture (the batch rolled by one; the turns of one multi-turn row share their picture,
    so those are skipped). An answer read from the picture should now fall to chance; a blank image (`image_gain`)
    tests less, since a model can learn what to say when it sees nothing.

    `items`: the_cauldron-style rows ({"images": [...], ...}) or the demo's samples ({"image": ..., "subset"}).
    """
    key = "images" if items and "images" in items[0] else "image"

    def subset(item):
        return item.get("subset") or _subset_of(item)

    out = []
    for name in dict.fromkeys(subset(item) for item in items):
        group = [item for item in items if subset(item) == name]
        for i, item in enumerate(group):
            others = (group[(i + k) % len(group)][key] for k in range(1, len(group)))
            picture = next((other for other in others if not _same_picture(other, item[key])), item[key])
            out.append({**item, key: picture})
    return out


def _same_picture(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(x is y for x, y in zip(a, b))
    return a is b
