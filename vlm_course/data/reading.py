"""Data for reading and pointing (lesson 09): Vary-toy's task prompts, and words in small print.

Vary-toy (arXiv 2401.12503) trains one model on several tasks and tells it which one by the prompt: "Provide the OCR
results of this image." for document OCR, a detection prompt that asks for boxes (written as text, 0-1000) for
grounding. `with_task_prompt` rewrites a mini-cauldron row's question that way, keeping its answer.

The mini-cauldron's `ocr` rows fit the word to the picture's width: at 64 px it is still legible. `small_print` draws
the same vocabulary with the same fonts at a third of the width or so, on a larger canvas (128 px by default): a few
pixels high once the picture is shrunk to 64 px, where one 8 px patch spans more than a letter. That is the case a
second, high-resolution vision branch is for.
"""

from __future__ import annotations

import re

import numpy as np

from . import synthetic

OCR_PROMPT = "Provide the OCR results of this image."
DETECTION_PROMPT = "Detect the {ref} in this image and give its box as [x1, y1, x2, y2]."
TASK_PROMPTS = {"ocr": OCR_PROMPT, "grounding": DETECTION_PROMPT}
_REFERENCE = re.compile(r".*\bthe ([a-z ]+?)[?.]")  # "What is the position of the red circle?" -> "red circle"


def task_prompt(subset: str, question: str) -> str:
    """The Vary-style prompt for a row of `subset`, or `question` unchanged for a subset without one."""
    if subset not in TASK_PROMPTS:
        return question
    if subset == "ocr":
        return OCR_PROMPT
    match = _REFERENCE.match(question)
    if match is None:
        raise ValueError(f"cannot find the object a grounding question refers to (as 'the <object>'): {question!r}")
    return DETECTION_PROMPT.format(ref=match.group(1))


def with_task_prompt(row: dict, subset: str) -> dict:
    """A copy of a the_cauldron-style row whose questions are the task's prompt; answers unchanged."""
    texts = [{**turn, "user": task_prompt(subset, turn["user"])} for turn in row["texts"]]
    return {**row, "texts": texts, "source": subset}


def small_print(n: int, seed: int = 0, image_size: int = 128, width: tuple[float, float] = (0.3, 0.45)) -> list[dict]:
    """n rows of one word each, drawn `width` of the picture wide (a fraction of its side), anywhere in it.

    Same words, fonts and text colours as the mini-cauldron's `ocr` subset; answers are the word. Deterministic in
    (n, seed, image_size): rows are drawn one after the other from one Generator seeded apart from the mini-cauldron's.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0 < width[0] <= width[1] < 1:
        raise ValueError(f"width is a range of fractions of the picture, 0 < low <= high < 1: got {width}")
    rng = np.random.default_rng([909, seed, image_size])
    rows = []
    for _ in range(n):
        word = synthetic._pick(rng, synthetic.WORDS)
        font_name = synthetic._pick(rng, synthetic.font_names())
        probe = synthetic.load_font(font_name, 100)
        left, top, right, bottom = probe.getbbox(word)
        target = rng.uniform(*width) * image_size  # the word's width in final pixels
        size = max(1, int(target / (right - left) * 100 * synthetic.SUPERSAMPLE))
        font = synthetic.load_font(font_name, size)
        left, top, right, bottom = (v / synthetic.SUPERSAMPLE for v in font.getbbox(word))
        margin = 0.04 * image_size
        x = rng.uniform(margin, max(margin, image_size - margin - (right - left))) - left
        y = rng.uniform(margin, max(margin, image_size - margin - (bottom - top))) - top
        image = synthetic.render(rng, image_size, text=(word, font, (x, y), synthetic._pick(rng, synthetic.TEXT_COLOURS)))
        rows.append({"images": [image], "texts": [{"user": OCR_PROMPT, "assistant": word, "source": "small-print"}],
                     "source": "ocr"})
    return rows
