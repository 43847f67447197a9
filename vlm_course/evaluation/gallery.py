"""What went wrong, to look at: the error gallery, and a before/after table of two runs.
"""

from __future__ import annotations

import itertools
import textwrap
from collections import defaultdict
from collections.abc import Sequence

from .records import EvalRecord, EvalResult


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
