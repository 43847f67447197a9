"""Lesson 06, evaluation: how VQA accuracy credits an answer, and ANLS against edit distance."""

from __future__ import annotations

from typing import Callable

import matplotlib.pyplot as plt
import numpy as np

from .common import _finish


def plot_vqa_credit(vqa_fn: Callable, num_answers: int = 10, show: bool = True):
    """VQA accuracy against how many of `num_answers` humans gave the model's answer.

    `vqa_fn(prediction, answers)` is the learner's `vqa_accuracy`; the dashed line is min(#agree / 3, 1)
    over all answers at once, which the leave-one-out average smooths (1 -> 0.3, 3 -> 0.9, 4 -> 1.0).
    """
    agree = np.arange(num_answers + 1)
    scores = [vqa_fn("yes", ["yes"] * n + ["no"] * (num_answers - n)) for n in agree]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.plot(agree, np.minimum(agree / 3, 1), "--", color="grey", label="min(#agree / 3, 1), all answers at once")
    ax.plot(agree, scores, "o-", color="tab:blue", label="VQA accuracy (leave-one-out average)")
    for n, s in zip(agree[:5], scores[:5]):
        ax.annotate(f"{s:.2f}", (n, s), textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xlabel(f"humans (of {num_answers}) who gave the model's answer")
    ax.set_ylabel("score")
    ax.set_xticks(agree)
    ax.set_ylim(-0.05, 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("partial credit: 1 agreeing human -> 0.3, 3 -> 0.9, 4 or more -> 1.0")
    return _finish(fig, show)


def plot_anls_curve(anls_fn: Callable, answer: str = "invoice 2024", threshold: float = 0.5, show: bool = True):
    """ANLS of predictions with 0, 1, 2, ... wrong characters in `answer` (substituted from the end).

    `anls_fn(prediction, answers, threshold)` is the learner's `anls`. The score falls by 1/len per wrong
    character, then drops to 0 once the similarity is below the threshold.
    """
    wrong = np.arange(len(answer) + 1)
    predictions = [answer[:len(answer) - k] + "#" * k for k in wrong]
    scores = [anls_fn(p, [answer], threshold) for p in predictions]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.plot(wrong, 1 - wrong / len(answer), "--", color="grey", label="1 - normalised edit distance")
    ax.plot(wrong, scores, "o-", color="tab:purple", label=f"ANLS (threshold {threshold:g})")
    ax.axhline(threshold, color="tab:red", lw=0.8, ls=":")
    ax.set_xlabel(f"wrong characters in the {len(answer)}-character answer {answer!r}")
    ax.set_ylabel("score")
    ax.set_ylim(-0.05, 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("near misses keep most of the credit; more than half wrong scores 0")
    return _finish(fig, show)
