"""Vary's first stage: teach the high-resolution branch its "vision vocabulary" on its own, before the VLM trains.

Vary (arXiv 2312.06109) and Vary-toy (arXiv 2401.12503) train the new vision branch first, on dense OCR and box
targets with a small decoder of its own, then train the whole VLM. The course's demo found the same lever from the
other side (docs/demo_findings.md, section 12): SmolLM2 learns in ~100 QLoRA steps to copy from image tokens that
*are* word embeddings, and much more slowly from tokens it has never seen. So here the branch's "small decoder" is
the language model's own embedding table: each of its output tokens is trained to equal the embedding of a word the
answer needs, and the decoder later reads it as that word.

    OCR picture ("juice")   every token, in turn, one of the answer's own token ids: ju ice ju ice ... (a copy job)
    scene                   per block of the branch's grid, the colour word of the object whose centre lies in it,
                            " none" where no centre does (what the demo's blocks say, one word per block)

    stage = VocabularyConfig(steps=120)
    report = train_vision_vocabulary(model, processor, stage)   # model: after dual_vision.add_high_res_branch

The loss is the relative squared error between each token and its target embedding (no language-model pass: one
ViT forward and backward per picture); the score is how often the nearest target-vocabulary embedding is the right
one. `refit_projector` solves the branch's linear projector in closed form on the ViT's features (ridge
regression onto the same targets), before the steps and again after them on the trained ViT: the demo measured a solved projector 5% off the words against 45% for
one trained by AdamW, and the decoder reads near-exact words much better.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .data import reading, synthetic
from .dual_vision import DualProjector, DualVisionEncoder

FILLER = " none"  # what a token says where there is nothing to read


@dataclass
class VocabularyConfig:
    steps: int = 120
    batch_size: int = 32
    lr_vision: float = 3e-4
    lr_projector: float = 2e-3
    ocr_images: int = 1500  # words in small print (reading.small_print)
    scene_images: int = 500  # 1-3 distinct objects, as the grounding subset draws them
    held_out: int = 100  # per kind
    seed: int = 2  # the experiment trains on seed 0 and scores on seed 1: the stage draws its own pictures
    ridge: float = 1e-2  # refit_projector's penalty, relative to the mean feature energy
    warmup_steps: int = 10


def _word_id(processor, word: str) -> int:
    return processor.text_ids(word)[0]


def ocr_targets(processor, word: str, slots: int) -> list[int]:
    """Token ids for the `slots` tokens of a picture of `word`: its answer ids, repeated in order."""
    ids = processor.text_ids(word)
    if not ids:
        raise ValueError(f"the word {word!r} has no tokens")
    return [ids[s % len(ids)] for s in range(slots)]


def scene_targets(processor, shapes, side: int, image_size: int) -> list[int]:
    """Per block of a side x side grid (row by row): the colour word of the object centred in it, else FILLER."""
    targets = [_word_id(processor, FILLER)] * (side * side)
    for s in sorted(shapes, key=lambda s: s.size):  # the larger object wins a shared block: written last
        row, col = (min(side - 1, int(v * side / image_size)) for v in (s.cy, s.cx))
        targets[row * side + col] = _word_id(processor, " " + s.colour)
    return targets


def _check_dual(model) -> None:
    if not isinstance(getattr(model, "vision", None), DualVisionEncoder) or not isinstance(
            getattr(model, "projector", None), DualProjector):
        raise TypeError("the vision vocabulary stage trains a second, high-resolution branch: give it a model after "
                        "vlm_course.dual_vision.add_high_res_branch")


def vocabulary_data(model, processor, n_ocr: int, n_scenes: int, seed: int) -> dict:
    """Pictures at the high branch's size and their per-token target ids: {"pixels", "targets", "kind"}."""
    _check_dual(model)
    size = model.config.high_res.vision.image_size
    side = math.isqrt(model.config.high_res.tokens_per_image)
    images, targets, kind = [], [], []
    for row in reading.small_print(n_ocr, seed=seed, image_size=size):
        images.append(row["images"][0])
        targets.append(ocr_targets(processor, row["texts"][0]["assistant"], side * side))
        kind.append(0)
    rng = np.random.default_rng([919, seed, size])
    for _ in range(n_scenes):
        shapes = synthetic.place(rng, synthetic._distinct_specs(rng, int(rng.integers(1, 4))), size, (0.2, 0.34))
        images.append(synthetic.render(rng, size, shapes))
        targets.append(scene_targets(processor, shapes, side, size))
        kind.append(1)
    return {"pixels": processor.preprocess_images(images), "targets": torch.tensor(targets),
            "kind": torch.tensor(kind)}


def high_tokens(model, pixels: torch.Tensor) -> torch.Tensor:
    """The high-resolution branch alone: (N, 3, H, W) -> (N, tokens, D)."""
    return model.projector.high(model.vision.high(pixels))


def relative_error(tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per token ||token - target||^2 / ||target||^2: 0 is the word itself, 1 is as far as a zero vector."""
    return (tokens - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)


@torch.no_grad()
def vocabulary_scores(model, data: dict, batch_size: int = 64) -> dict[str, float]:
    """Relative error, nearest-word accuracy per token, and pictures whose every token is right (per kind)."""
    table = model.decoder.embed_tokens.weight.detach().float()
    vocab = torch.unique(data["targets"])
    errors, right = [], []
    for i in range(0, len(data["targets"]), batch_size):
        tokens = high_tokens(model, data["pixels"][i:i + batch_size].float()).float()
        ids = data["targets"][i:i + batch_size]
        errors.append(relative_error(tokens, table[ids]))
        nearest = vocab[torch.cdist(tokens.flatten(0, 1), table[vocab]).argmin(-1)].view_as(ids)
        right.append(nearest == ids)
    errors, right = torch.cat(errors), torch.cat(right)
    out = {"relative_error": float(errors.mean()), "token_accuracy": float(right.float().mean())}
    for k, name in enumerate(("ocr", "scene")):
        mask = data["kind"] == k
        if mask.any():
            out[f"{name}_all_tokens_right"] = float(right[mask].all(1).float().mean())
    return out


@torch.no_grad()
def refit_projector(model, data: dict, ridge: float = 1e-2, batch_size: int = 64) -> None:
    """Solve the high branch's linear projector by ridge regression of the target embeddings on the block vectors."""
    proj = model.projector.high.proj
    if not isinstance(proj, nn.Linear) or model.projector.high.cfg.tokens_per_block != 1:
        raise ValueError("refit_projector solves a linear projector with one token per block; this branch's is "
                         f"{type(proj).__name__} with tokens_per_block={model.projector.high.cfg.tokens_per_block}")
    table = model.decoder.embed_tokens.weight.detach().double()
    width = proj.in_features + (proj.bias is not None)
    gram = torch.zeros(width, width, dtype=torch.float64)
    moment = torch.zeros(width, table.shape[1], dtype=torch.float64)
    for i in range(0, len(data["targets"]), batch_size):  # the normal equations, a batch at a time (memory)
        blocks = model.projector.high.blocks(model.vision.high(data["pixels"][i:i + batch_size].float()))
        x = blocks.flatten(0, 1).double()
        if proj.bias is not None:
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        gram += x.T @ x
        moment += x.T @ table[data["targets"][i:i + batch_size].flatten()]
    penalty = ridge * gram.diagonal().mean() * torch.eye(width, dtype=torch.float64)
    solution = torch.linalg.solve(gram + penalty, moment)  # (in [+1], D)
    if proj.bias is not None:
        proj.bias.copy_(solution[-1].to(proj.bias.dtype))
        solution = solution[:-1]
    proj.weight.copy_(solution.T.to(proj.weight.dtype))


def _lr_scale(step: int, cfg: VocabularyConfig) -> float:
    warmup = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    return warmup * 0.5 * (1 + math.cos(math.pi * step / max(1, cfg.steps)))


def train_vision_vocabulary(model, processor, cfg: VocabularyConfig, log_every: int = 0) -> dict:
    """Solve the high branch's projector, train it with its ViT to speak in the decoder's words, solve it again.

    Touches only `model.vision.high` and `model.projector.high`; the decoder's embedding table is read, not
    trained. Returns held-out scores before and after, the loss history and the seconds taken.
    """
    _check_dual(model)
    if cfg.steps < 0 or cfg.batch_size < 1:
        raise ValueError(f"steps must be >= 0 and batch_size >= 1, got {cfg.steps} and {cfg.batch_size}")
    started, cpu_started = time.perf_counter(), time.process_time()
    torch.manual_seed(cfg.seed)
    train = vocabulary_data(model, processor, cfg.ocr_images, cfg.scene_images, cfg.seed)
    held_out = vocabulary_data(model, processor, cfg.held_out, cfg.held_out, cfg.seed + 100)
    table = model.decoder.embed_tokens.weight.detach().float()
    vision, projector = model.vision.high, model.projector.high
    before = vocabulary_scores(model, held_out)
    # start from the solved projector: a fresh one writes tokens ~10x the embeddings' norm (relative error ~100
    # on the smol profile), and AdamW would spend its steps on the scale before the words
    refit_projector(model, train, cfg.ridge)
    solved_first = vocabulary_scores(model, held_out)
    groups = [{"params": list(vision.parameters()), "lr": cfg.lr_vision},
              {"params": list(projector.parameters()), "lr": cfg.lr_projector}]
    for group in groups:
        group["base_lr"] = group["lr"]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.95))
    vision.train()
    projector.train()
    history = []
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * _lr_scale(step, cfg)
        idx = torch.randint(0, len(train["targets"]), (cfg.batch_size,))
        tokens = high_tokens(model, train["pixels"][idx].float())
        loss = relative_error(tokens, table[train["targets"][idx]]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        history.append(round(loss.item(), 4))
        if log_every and (step + 1) % log_every == 0:
            print(f"vocabulary step {step + 1:4d} loss {loss.item():.3f}", flush=True)
    vision.eval()
    projector.eval()
    trained = vocabulary_scores(model, held_out)
    refit_projector(model, train, cfg.ridge)
    solved = vocabulary_scores(model, held_out)
    return {"before": before, "solved_first": solved_first, "trained": trained, "solved": solved,
            "loss_history": history,
            "seconds": round(time.perf_counter() - started, 1),
            "cpu_seconds": round(time.process_time() - cpu_started, 1)}
