"""Lesson 09, reading and pointing: boxes drawn over their picture, a picture at each branch's resolution, and the
measured comparison of one branch against two."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

from .common import _finish, to_image_array


def plot_boxes(image, boxes: dict, show: bool = True):
    """The picture with 0-1000 boxes drawn over it: `boxes` maps a label ("gold", "model") to (x1, y1, x2, y2)."""
    array = to_image_array(image)
    height, width = array.shape[:2]
    fig, ax = plt.subplots(figsize=(3.6, 3.6))
    ax.imshow(array, extent=(0, 1000, 1000, 0))
    colours = ("tab:green", "tab:red", "tab:blue", "tab:orange")
    for (name, box), colour in zip(boxes.items(), colours):
        if box is None:
            continue
        x1, y1, x2, y2 = box
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=colour, lw=2, label=f"{name} {list(box)}"))
    ax.set_xlim(0, 1000)
    ax.set_ylim(1000, 0)
    ax.set_title(f"{width} x {height} px, boxes in 0-1000", fontsize=9)
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, -0.32))
    return _finish(fig, show)


def plot_resolutions(images, sizes=(128, 64), titles=None, show: bool = True):
    """Each picture as each branch sees it: resized to every size in `sizes` (nearest-neighbour display)."""
    from PIL import Image

    fig, axes = plt.subplots(len(sizes), len(images), figsize=(1.9 * len(images), 2.0 * len(sizes)), squeeze=False)
    for col, image in enumerate(images):
        for row, size in enumerate(sizes):
            shrunk = image.resize((size, size), Image.Resampling.BICUBIC)
            axes[row][col].imshow(to_image_array(shrunk), interpolation="nearest")
            axes[row][col].set_xticks([])
            axes[row][col].set_yticks([])
            if col == 0:
                axes[row][col].set_ylabel(f"{size} px", fontsize=9)
            if row == 0 and titles:
                axes[row][col].set_title(titles[col], fontsize=9)
    fig.suptitle("the same words at each branch's resolution", fontsize=10)
    return _finish(fig, show)


TARGETS = {"ocr_anls": 0.6, "grounding_acc50": 0.5}  # the lesson's targets with two branches


def plot_reading_results(results: dict, show: bool = True):
    """Bars per variant and score, right image against another scene's: results[variant][image][score]."""
    scores = ("ocr_anls", "grounding_acc50", "grounding_mean_iou")
    names = {"ocr_anls": "OCR ANLS", "grounding_acc50": "grounding Acc@0.5", "grounding_mean_iou": "mean IoU"}
    fig, axes = plt.subplots(1, len(scores), figsize=(9, 3.0), sharey=True)
    for ax, score in zip(axes, scores):
        variants = list(results)
        for k, variant in enumerate(variants):
            right = results[variant]["right_image"][score]
            other = results[variant]["other_image"][score]
            ax.bar(k - 0.18, right, 0.36, color="tab:blue", label="right image" if k == 0 else None)
            ax.bar(k + 0.18, other, 0.36, color="#bbbbbb", label="another scene's image" if k == 0 else None)
            ax.text(k - 0.18, right + 0.02, f"{right:.2f}", ha="center", fontsize=8)
        if score in TARGETS:
            ax.axhline(TARGETS[score], color="tab:green", ls="--", lw=1, label="target" if score == scores[0] else None)
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels([v.replace(" ", "\n", 1) for v in variants], fontsize=8)
        ax.set_title(names[score], fontsize=9)
        ax.set_ylim(0, 1.05)
    axes[0].legend(fontsize=7, loc="upper left")
    return _finish(fig, show)
