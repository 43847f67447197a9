"""Shared by the experiment scripts (run from the repository root: their folder is first on sys.path)."""
import os

import torch

from vlm_course.data import synthetic
from vlm_course.demo import collate, compute_autocast
from vlm_course.training import answer_loss_sum


def threads_from_env() -> None:
    """THREADS=1 runs an experiment on one core, so that two can run side by side."""
    if os.environ.get("THREADS"):
        torch.set_num_threads(int(os.environ["THREADS"]))


def generate_with_shapes(subset: str, n: int, seed: int) -> list[tuple[dict, list]]:
    """synthetic.generate's rows, each with the objects drawn in its image (the ground truth a caption states)."""
    drawn, render = [], synthetic.render

    def recording_render(rng, image_size, shapes=(), text=None):
        drawn.append(list(shapes))
        return render(rng, image_size, shapes, text)

    synthetic.render = recording_render
    try:
        rows = synthetic.generate(subset, n, seed=seed)
    finally:
        synthetic.render = render
    return list(zip(rows, drawn))


def image_dependence(model, proc, held_out: dict, label: str) -> dict:
    """Answer loss with each sample's own image vs the batch rolled by one (someone else's image).

    held_out: {name: encoded samples}. Equal losses mean the answers do not depend on the image.
    """
    out = {}
    for name, enc in held_out.items():
        b = collate(proc, enc)
        rolled = dict(b, pixel_values=b["pixel_values"].roll(1, 0))
        with torch.no_grad(), compute_autocast(model):
            (l1, n1), (l2, n2) = answer_loss_sum(model, b), answer_loss_sum(model, rolled)
        out[name] = (round((l1 / n1).item(), 3), round((l2 / n2).item(), 3))
    print(label, "loss own image vs rolled:", out, flush=True)
    return out
