"""The training loss: cross-entropy on the answer tokens only, summed, with their count.

Summed (not averaged) per micro-batch: the Trainer divides by the answer tokens of the whole optimiser step,
so 4 micro-batches of 2 give the same gradient as one batch of 8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.collate import VLMCollator
from ..processing import IGNORE_INDEX
from .config import autocast_dtype


def neftune_noise(embeds: torch.Tensor, text_mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """NEFTune (Jain et al. 2023): uniform noise of scale alpha / sqrt(L * d) on each sample's text embeddings.

    L is the sample's number of real tokens, d the width. Image features are left clean (Idefics2 noises the
    text embeddings). Only in training: evaluation and generation never call this.
    """
    lengths = text_mask.sum(dim=1, keepdim=True).clamp(min=1).unsqueeze(-1)  # (B, 1, 1)
    scale = alpha / torch.sqrt(lengths * embeds.shape[-1])
    noise = torch.empty_like(embeds).uniform_(-1, 1) * scale
    return embeds + noise * text_mask.unsqueeze(-1)


def answer_loss_sum(model, batch: dict, neftune_alpha: float | None = None) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's answer tokens, and their count.

    The LM head runs only at answer positions: the vocabulary is 49152 wide, so logits for every position
    would cost (B x T x 49152) floats and a large share of the FLOPs for nothing.
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    # the decoder to run: the model's own, or with the fusion's cross-attention blocks (vlm_course/fusion.py)
    embeds, decoder = model.prepare(input_ids, batch.get("pixel_values"))
    if neftune_alpha:
        text = (input_ids != model.image_token_id) & attention_mask.bool()
        embeds = neftune_noise(embeds, text.to(embeds.dtype), neftune_alpha)
    out = decoder(inputs_embeds=embeds, attention_mask=attention_mask, logits_to_keep=1)
    targets = labels[:, 1:]  # position t predicts token t + 1
    keep = targets != IGNORE_INDEX
    logits = model.decoder.lm_head(out.hidden_states[:, :-1][keep])
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, int(keep.sum())


def make_loss_eval(collator: VLMCollator, rows, batch_size: int = 8, precision: str = "fp32"):
    """An eval_fn computing the answer-token loss on held-out rows (mean over all their answer tokens)."""

    def eval_fn(model, step):
        device = next(model.parameters()).device
        dtype = autocast_dtype(precision, device)
        total, count = 0.0, 0
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collator(list(rows[i:i + batch_size])).items()}
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss_sum, n = answer_loss_sum(model, batch)
            total, count = total + loss_sum.item(), count + n
        return {"eval_loss": total / max(count, 1)}

    return eval_fn
