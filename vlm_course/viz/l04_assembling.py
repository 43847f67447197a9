"""Lesson 04, assembling the VLM: the token sequence with its image slots and labels, embedding sizes."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from .common import _finish


def plot_token_sequence(tokens: list[str], input_ids, labels=None, image_token_id: int | None = None,
                        per_row: int = 14, collapse_images: bool = True, title: str | None = None, show: bool = True):
    """A conversation's tokens as coloured boxes, in reading order: image tokens, trained (labelled) answer
    tokens, and the rest (prompt, template, padding). A run of image tokens is drawn as one wide box with its
    count when `collapse_images`."""
    ids = [int(i) for i in (input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids)]
    trained = [False] * len(ids) if labels is None else [int(x) != -100 for x in
                                                         (labels.tolist() if hasattr(labels, "tolist") else labels)]
    boxes = []  # (text, kind, width)
    i = 0
    while i < len(ids):
        if image_token_id is not None and ids[i] == image_token_id:
            j = i
            while j < len(ids) and ids[j] == image_token_id:
                j += 1
            if collapse_images:
                boxes.append((f"<image> x {j - i}", "image", 3))
            else:
                boxes.extend(("<image>", "image", 1) for _ in range(i, j))
            i = j
            continue
        text = tokens[i].replace("\n", "\\n").replace("Ġ", "␣").replace("Ċ", "\\n")
        boxes.append((text if len(text) <= 12 else text[:11] + "…", "answer" if trained[i] else "text", 1))
        i += 1
    colours = {"image": "#f4a261", "answer": "#8ecae6", "text": "#e9ecef"}
    rows, x, placed = 0, 0, []
    for text, kind, width in boxes:
        if x + width > per_row:
            rows, x = rows + 1, 0
        placed.append((x, rows, text, kind, width))
        x += width
    fig, ax = plt.subplots(figsize=(per_row * 0.85, 0.55 * (rows + 1) + 0.8))
    for x, row, text, kind, width in placed:
        ax.add_patch(plt.Rectangle((x + 0.04, -row - 0.9), width - 0.08, 0.8, color=colours[kind], ec="grey", lw=0.5))
        ax.text(x + width / 2, -row - 0.5, text, ha="center", va="center", fontsize=7, family="monospace")
    ax.set_xlim(0, per_row)
    ax.set_ylim(-rows - 1.05, 0.05)
    ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(handles, ["image tokens", "trained (label = token)", "not trained (label -100)"], ncol=3, fontsize=8,
              loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return _finish(fig, show)


def plot_embedding_rms(embeds: torch.Tensor, input_ids, image_token_id: int, title: str | None = None,
                       show: bool = True):
    """Root-mean-square size of each position's input vector to the decoder (one sample), image positions
    highlighted: an untrained projector writes vectors of a very different size from the word embeddings."""
    rms = embeds.detach().float().pow(2).mean(-1).sqrt().cpu()
    rms = rms[0] if rms.dim() == 2 else rms
    ids = torch.as_tensor(input_ids)
    ids = ids[0] if ids.dim() == 2 else ids
    is_image = (ids == image_token_id).cpu().numpy()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    positions = np.arange(len(rms))
    ax.bar(positions[~is_image], rms.numpy()[~is_image], color="#adb5bd", label="text token embeddings")
    ax.bar(positions[is_image], rms.numpy()[is_image], color="#f4a261", label="projected image features")
    ax.set_yscale("log")
    ax.set_xlabel("position in the sequence")
    ax.set_ylabel("RMS of the input vector")
    ax.set_title(title or "what the decoder receives, position by position")
    ax.legend(fontsize=8)
    return _finish(fig, show)
