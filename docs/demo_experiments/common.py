"""Shared by the experiment scripts (run from the repository root: their folder is first on sys.path)."""
import torch

from vlm_course.demo import collate, compute_autocast
from vlm_course.training import answer_loss_sum


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
