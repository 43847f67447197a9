"""The offline instructor demo: a real VLM trained on a laptop CPU, offline, in about 21 minutes.

    python -m vlm_course demo            # (or `make demo`) profile smol: ~21 min in all on 2 CPU cores
    python -m vlm_course demo --quick    # a few steps: checks the pipeline end to end
    python -m vlm_course demo --profile tiny --quick    # seconds: random tiny model (tests)

What it does, with no network:
  1. builds the `smol` VLM with the demo's image side: the course ViT pretrained per block (assets/vit_demo, 72 px)
     + pixel shuffle into 3 x 3 blocks, two tokens each, each block's place written in words before its tokens
     + the real SmolLM2-135M-Instruct (from the offline GGUF; converted once, ~25 s);
  2. QLoRA: the decoder's linear layers become 4-bit NF4 (bitsandbytes) and get LoRA adapters (peft);
  3. measures the untrained model on the held-out mini-cauldron (shapes, count, position, spatial, mc);
  4. trains in two stages (see `DemoRecipe`): the projector solved by least squares onto the decoder's word
     embeddings, then QLoRA on the questions, with a tqdm bar and a loss curve;
  5. measures again, with the right image and with another scene's, prints sample answers, saves figures and the
     checkpoint under runs/demo/ (never assets/), and ends with one line of figures.

The committed copy, assets/demo_checkpoint, is this run's output: `python -m vlm_course demo`, then
`cp runs/demo/checkpoint/* runs/demo/results.json runs/demo/*.png assets/demo_checkpoint/`.

The recipe, and why each number is what it is, lives in `DemoRecipe` below.

Status (measured by `make demo` on 2 cores, 2026-12-01; 200 held-out questions per subset): after 13.7 min of
training the model reads colour/shape and position from the picture: shapes 0.00 -> 0.94 and position 0.00 -> 0.83,
falling to 0.23 and 0.08 (chance 0.20, 0.11) with another scene's image. Counting, spatial relations and lettered
options are not learnt: count 0.20, spatial 0.51, mc 0.27 (chance 0.20 / 0.50 / 0.25). The trained weights are
committed in assets/demo_checkpoint; docs/demo_findings.md section 12 has the recipe's measurements.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import get_profile
from .decoder import RMSNorm
from .evaluation import mmstar_match, normalize_answer
from .processing import VLMProcessor
from .vlm import VisionLanguageModel

EVAL_SUBSETS = ("shapes", "count", "position", "spatial", "mc")
# Uniform guessing among the answers: shapes asks for one of 4 shapes or 6 colours (~1/5), count for 1-5, position
# for one of 9 parts of the picture, spatial for yes/no, mc for one of 4 letters.
CHANCE = {"shapes": 0.2, "count": 0.2, "position": 1 / 9, "spatial": 0.5, "mc": 0.25}
TARGET_SUBSETS = ("shapes", "count", "position")  # read from the image; spatial and mc are the frontier


# ----------------------------------------------------------------------------------------------
# The recipe


@dataclass
class Stage:
    name: str
    steps: int
    lr_projector: float
    lr_vision: float  # 0: the ViT stays frozen in this stage
    lr_lora: float  # 0: the decoder stays frozen (LoRA adapters untouched)
    warmup_steps: int
    # "qa": the mini-cauldron's questions; "captions": dense synthetic captions (`caption_samples`); "words": fresh
    # scenes whose image tokens are regressed onto the decoder's embeddings of the words that name each block's
    # object (`word_targets`): no decoder forward pass, so a step costs a ViT pass only.
    data: str = "qa"
    batch_size: int | None = None  # None: the recipe's batch_size
    # "gradient": `steps` AdamW steps. "least_squares" (data="words" only): the linear projector is solved in closed
    # form (ridge regression of the word embeddings on the frozen ViT's block vectors) from `scenes` fresh scenes.
    fit: str = "gradient"
    scenes: int = 0


@dataclass
class DemoRecipe:
    subsets: tuple[str, ...] = EVAL_SUBSETS
    train_per_subset: int = 2000  # the committed mini-cauldron's train split
    eval_per_subset: int = 200  # the whole held-out split
    batch_size: int = 16
    # QLoRA, as SmolVLM's fine-tuning notebook: NF4 base, LoRA on every linear layer of the decoder.
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    double_quant: bool = False  # quantised block scales save 0.4 bit/weight but cost a 2nd dequantisation per matmul
    system_prompt: str | None = None  # no system prompt: 20 tokens shorter, every step is cheaper
    # "auto": bf16 compute where the CPU multiplies natively in bf16 (AVX512-BF16 / AMX, ~2.5x fp32), else
    # fp32: on an AVX2-only CPU emulated bf16 matmuls run ~100x slower than fp32 (0.9 vs 127 GFLOP/s measured).
    precision: str = "auto"
    # The image side. 72 px images (the 64 px scenes are resized) in 8 px patches: a 9 x 9 grid, pixel-shuffled
    # by 3 into 3 x 3 blocks, one per part of the picture a person names ("top left", ..., "bottom right"). Each
    # block becomes 2 tokens, and the processor writes the block's place in words before them (layout "grid").
    image_size: int = 72
    # Where the ViT starts: a folder in SigLIP naming (a relative name is looked up in assets/ too), or None for the
    # profile's ViT resized to image_size. assets/vit_demo: `python -m vlm_course.pretrain_blocks` (per-block heads).
    vision_weights: str | None = "vit_demo"
    shuffle_factor: int = 3
    tokens_per_block: int = 2
    image_layout: str = "grid"
    projector_bias: bool = True  # the " no" " object" of an empty block is a constant: a bias carries it
    # After the blocks, one token per shape, colour and "objects" holding the picture's tally as a digit's embedding
    # (`vlm_course.counting`): counting becomes copying the number after " circles". Without them count stayed at
    # chance (0.20, docs/demo_findings.md section 12).
    count_tokens: bool = True
    stages: tuple[Stage, ...] = field(default_factory=lambda: (
        # Stage 1 makes the image tokens speak the decoder's language: each block's two tokens are regressed onto
        # the embeddings of " red" " circle" (or " no" " object"). No decoder pass: seconds per 100 steps.
        Stage("words", steps=0, lr_projector=0.0, lr_vision=0.0, lr_lora=0.0, warmup_steps=0, data="words",
              fit="least_squares", scenes=16_000),
        Stage("qlora", steps=200, lr_projector=0.0, lr_vision=0.0, lr_lora=1e-3, warmup_steps=10),
    ))
    max_new_tokens: int = 4  # every answer is 1-2 tokens + <|im_end|>
    eval_batch_size: int = 50
    seed: int = 0

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)


# Recipe fields added after checkpoints were committed, with the value that rebuilds those checkpoints' model.
RECIPE_KEYS_ADDED_LATER = {"count_tokens": False}


def quick_recipe(recipe: DemoRecipe) -> DemoRecipe:
    """A few steps of each stage on a handful of rows: checks the pipeline, learns nothing."""
    stages = tuple(replace(s, steps=3 if s.fit == "gradient" else 0, warmup_steps=1, scenes=min(s.scenes, 64))
                   for s in recipe.stages)
    return replace(recipe, stages=stages, train_per_subset=16, eval_per_subset=8, batch_size=4, eval_batch_size=16)


# ----------------------------------------------------------------------------------------------
# QLoRA: 4-bit NF4 base (bitsandbytes) + LoRA adapters (peft)


def make_qlora(model: VisionLanguageModel, recipe: DemoRecipe) -> None:
    """Quantise the decoder's transformer layers to NF4 and inject LoRA adapters (in place).

    The building blocks are `vlm_course.training`'s (quantize_4bit, add_lora). Only `model.decoder.layers`
    is quantised: the ViT and projector, which train fully, are untouched. The decoder's other frozen
    weights (embeddings = tied LM head, RMSNorm scales) are stored in the compute dtype (bf16 where the CPU
    has native bf16, see `DemoRecipe.precision`, else fp32). With bf16 the residual stream then stays in bf16
    end to end instead of being converted fp32 <-> bf16 around each of the 210 linear layers (a fifth of a
    step's CPU time in a profile). RoPE's frequency table stays fp32.
    """
    from .training import TrainConfig, add_lora, autocast_dtype, quantize_4bit

    dtype = autocast_dtype(recipe.precision, torch.device("cpu")) or torch.float32
    model.decoder.requires_grad_(False)
    quantize_4bit(model.decoder.layers, compute_dtype=dtype, double_quant=recipe.double_quant)
    model.decoder.embed_tokens.to(dtype)  # .to() keeps the Parameter object: the LM head stays tied
    for module in model.decoder.modules():
        if isinstance(module, RMSNorm):
            module.to(dtype)
    lora = TrainConfig(decoder="qlora", lora_r=recipe.lora_r, lora_alpha=recipe.lora_alpha,
                       lora_dropout=recipe.lora_dropout, lora_targets=recipe.lora_targets)
    add_lora(model.decoder, recipe.lora_targets, lora)


def compute_autocast(model: VisionLanguageModel) -> torch.autocast:
    """bf16 autocast if make_qlora chose bf16 compute for this model (its embeddings say so), else a no-op."""
    dtype = model.decoder.embed_tokens.weight.dtype
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def lora_parameters(model: VisionLanguageModel) -> list[nn.Parameter]:
    return [p for n, p in model.decoder.named_parameters() if "lora_" in n]


# ----------------------------------------------------------------------------------------------
# Data


def load_samples(split: str, subsets, per_subset: int) -> list[dict]:
    """Mini-cauldron rows as single-turn samples {subset, image, question, answer}.

    A multi-turn row (some shapes/spatial rows ask two questions about one image) becomes one sample per
    turn: shorter sequences, and each question is asked exactly as it is at evaluation time.
    """
    from .data import load_mini_cauldron

    samples = []
    for subset in subsets:
        rows = load_mini_cauldron(split, [subset], max_per_subset=per_subset, verbose=False)
        for row in rows:
            for turn in row["texts"]:
                samples.append({"subset": subset, "image": row["images"][0], "question": turn["user"],
                                "answer": turn["assistant"]})
    return samples


def encode_samples(processor: VLMProcessor, samples: list[dict]) -> list[dict]:
    """Tokenise and transform once, before training: the steps then only pad and stack.

    Pixels are kept in float16 (exact enough for 8-bit images scaled to [-1, 1]): 9,000 samples then take
    220 MB instead of 450 MB. `Batches` turns them back into float32.
    """
    encoded = []
    for s in samples:
        enc = processor.encode_conversation([{"user": s["question"], "assistant": s["answer"]}], [s["image"]])
        enc["pixel_values"] = enc["pixel_values"].half()
        encoded.append(enc)
    return encoded


def answer_loss(model: VisionLanguageModel, batch: dict) -> torch.Tensor:
    """Mean next-token loss over the batch's answer tokens; the LM head (49152 x 576, a fifth of SmolLM2's
    matmuls) runs only at those positions (`training.answer_loss_sum`). Equals `model(**batch).loss`."""
    from .training import answer_loss_sum

    total, count = answer_loss_sum(model, batch)
    return total / max(count, 1)


CAPTION_PROMPT = "Describe the image."
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")


def where(shape, image_size: int) -> str:
    """A coarse position on a 3 x 3 grid: 'top left', 'top', ..., 'center', ..., 'bottom right'."""
    row = ROWS[min(2, int(shape.cy * 3 / image_size))]
    col = COLS[min(2, int(shape.cx * 3 / image_size))]
    if row == "middle":
        return col
    return row if col == "center" else f"{row} {col}"


def caption(shapes, image_size: int) -> str:
    """'3 objects: red circle top left, blue square center, green triangle bottom right.' in reading order."""
    ordered = sorted(shapes, key=lambda s: (min(2, int(s.cy * 3 / image_size)), s.cx))
    parts = [f"{s.colour} {s.shape} {where(s, image_size)}" for s in ordered]
    noun = "object" if len(shapes) == 1 else "objects"
    return f"{len(shapes)} {noun}: " + ", ".join(parts) + "."


def caption_samples(n: int, seed: int, image_size: int = 64) -> list[dict]:
    """n fresh synthetic scenes (the mini-cauldron's drawing code) with a dense caption each.

    Why captions: a mini-cauldron answer is one or two tokens, so most of a step's compute goes into the
    prompt; a caption names every object's colour, shape and place, ~20 supervised tokens per image. That is
    LLaVA's recipe too: align the projector on captions with the decoder frozen, then instruction-tune.
    """
    import numpy as np

    from .data import synthetic
    from .pretrain_vit import random_specs

    rng = np.random.default_rng([seed, 7])  # a stream of its own: never the mini-cauldron's seeds
    samples = []
    for _ in range(n):
        lo = rng.uniform(0.14, 0.24)
        shapes = synthetic.place(rng, random_specs(rng), image_size, (lo, lo + 0.12), gap=2.0)
        samples.append({"subset": "captions", "image": synthetic.render(rng, image_size, shapes),
                        "question": CAPTION_PROMPT, "answer": caption(shapes, image_size)})
    return samples


def block_words(shapes, side: int = 3) -> list[str]:
    """Two words per block of a side x side grid, row by row: the colour and shape of the object whose centre
    lies in the block (" red", " circle"), or " no", " object" (`pretrain_blocks.block_objects` decides)."""
    from .pretrain_blocks import block_objects

    words = []
    for s in block_objects(shapes, side):
        words += [f" {s.colour}", f" {s.shape}"] if s is not None else [" no", " object"]
    return words


def word_targets(processor: VLMProcessor, n: int, seed: int, progress: bool = False) -> dict[str, torch.Tensor]:
    """n fresh scenes (never the mini-cauldron's seeds) as pixel values and the ids of each block's words."""
    import numpy as np

    from .data import synthetic
    from .pretrain_blocks import SCENE_SIZE, random_scene

    config = processor.config
    if config.projector.tokens_per_block != 2:
        raise ValueError("word targets name each block with two words: use tokens_per_block=2")
    rng = np.random.default_rng([seed, 11])
    pixels, ids = [], []
    for _ in tqdm(range(n), desc="drawing scenes", leave=False, disable=not progress):
        shapes = random_scene(rng)
        pixels.append(processor.image_transform(synthetic.render(rng, SCENE_SIZE, shapes)).half())
        ids.append([processor.text_ids(w)[0] for w in block_words(shapes, config.block_grid_size)])
    return {"pixel_values": torch.stack(pixels), "word_ids": torch.tensor(ids), "vocabulary": block_vocabulary(processor)}


class WordBatches:
    """Batches of (pixel_values, word_ids) for the "words" stage, in order: every scene is seen once."""

    def __init__(self, data: dict[str, torch.Tensor], batch_size: int):
        self.data, self.batch_size, self.start = data, batch_size, 0

    def next(self) -> dict:
        end = self.start + self.batch_size
        if end > len(self.data["word_ids"]):
            self.start, end = 0, self.batch_size
        batch = {k: self.data[k][self.start:end] for k in ("pixel_values", "word_ids")}
        self.start = end
        return {"pixel_values": batch["pixel_values"].float(), "word_ids": batch["word_ids"],
                "vocabulary": self.data.get("vocabulary")}


def block_vocabulary(processor: VLMProcessor) -> torch.Tensor:
    """The ids of the words a block can be named with: the six colours, the four shapes, " no" and " object"."""
    from .data import synthetic

    words = [f" {w}" for w in (*synthetic.COLOURS, *synthetic.SHAPES, "no", "object")]
    return torch.tensor([processor.text_ids(w)[0] for w in words])


def word_loss(model: VisionLanguageModel, batch: dict, vocabulary: torch.Tensor | None = None) -> torch.Tensor:
    """Squared distance of each image token to its word's embedding, relative to that embedding's squared norm;
    with a vocabulary of candidate ids, plus a cross-entropy that makes the target word the *nearest* candidate
    (the squared error alone is small for a token halfway between " circle" and " square")."""
    tokens = model.projector.block_tokens(model.vision(batch["pixel_values"])).float()
    with torch.no_grad():
        targets = model.decoder.embed_tokens(batch["word_ids"]).float()
    loss = (((tokens - targets) ** 2).sum(-1) / (targets**2).sum(-1)).mean()
    if vocabulary is not None:
        with torch.no_grad():
            table = model.decoder.embed_tokens(vocabulary).float()
        logits = -torch.cdist(tokens, table.expand(len(tokens), -1, -1)) ** 2
        classes = (batch["word_ids"].unsqueeze(-1) == vocabulary).float().argmax(-1)
        loss = loss + F.cross_entropy(logits.flatten(0, 1), classes.flatten())
    return loss


@torch.no_grad()
def fit_projector_to_words(model: VisionLanguageModel, data: dict[str, torch.Tensor], ridge: float = 1e-2,
                           chunk: int = 500) -> float:
    """Solve the linear projector in closed form: the weights W minimising ||X W - Y||^2 + ridge ||W||^2, where X
    holds the frozen ViT's pixel-shuffled block vectors (plus a 1 for the bias) and Y the embeddings of the
    block's two words side by side. Seconds instead of minutes of gradient steps, and a lower error (0.05
    relative squared error against 0.45 after 150 AdamW steps: docs/demo_findings.md). Returns that training error."""
    from .projector import pixel_shuffle

    proj = model.projector.proj
    if not isinstance(proj, nn.Linear):
        raise ValueError("a least-squares fit needs the linear projector (ProjectorConfig.kind='linear')")
    r = model.projector.cfg.shuffle_factor
    width = proj.in_features + (proj.bias is not None)
    gram = torch.zeros(width, width, dtype=torch.float64)
    cross = torch.zeros(width, proj.out_features, dtype=torch.float64)
    for i in range(0, len(data["word_ids"]), chunk):
        x = pixel_shuffle(model.vision(data["pixel_values"][i:i + chunk].float()), r).flatten(0, 1)
        if proj.bias is not None:
            x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
        y = model.decoder.embed_tokens(data["word_ids"][i:i + chunk]).float().reshape(len(x), -1)
        gram += x.double().T @ x.double()
        cross += x.double().T @ y.double()
    solution = torch.linalg.solve(gram + ridge * torch.eye(width, dtype=torch.float64), cross).float()
    proj.weight.copy_(solution[:proj.in_features].T)
    if proj.bias is not None:
        proj.bias.copy_(solution[-1])
    tokens = model.projector.block_tokens(model.vision(data["pixel_values"][:chunk].float())).float()
    targets = model.decoder.embed_tokens(data["word_ids"][:chunk]).float()
    return float((((tokens - targets) ** 2).sum(-1) / (targets**2).sum(-1)).mean())


@torch.no_grad()
def word_accuracy(model: VisionLanguageModel, processor: VLMProcessor, data: dict[str, torch.Tensor]) -> float:
    """How often an image token's nearest embedding, among the words the stage uses, is its target word."""
    vocab_ids = block_vocabulary(processor)
    table = model.decoder.embed_tokens(vocab_ids).float()
    tokens = model.projector.block_tokens(model.vision(data["pixel_values"].float())).float()
    nearest = vocab_ids[torch.cdist(tokens, table.expand(len(tokens), -1, -1)).argmin(-1)]
    return float((nearest == data["word_ids"]).float().mean())


def collate(processor: VLMProcessor, encoded: list[dict], padding_side: str = "right") -> dict:
    """Pad encoded samples into a training batch, pixels back to float32."""
    batch = processor.pad(encoded, padding_side=padding_side)
    batch["pixel_values"] = batch["pixel_values"].float()
    return batch


def training_batches(processor: VLMProcessor, encoded_qa: list[dict], recipe: DemoRecipe) -> dict[str, "Batches"]:
    """The batch sources the stages ask for: the mini-cauldron's QA, and fresh captions (one pass) if needed."""
    sources = {"qa": Batches(processor, encoded_qa, recipe.batch_size, recipe.seed)}
    for stage in recipe.stages:
        if stage.fit == "least_squares":
            sources[stage.name] = word_targets(processor, stage.scenes, recipe.seed)
    word_stages = [s for s in recipe.stages if s.data == "words" and s.fit == "gradient"]
    if word_stages:
        size = max(s.batch_size or recipe.batch_size for s in word_stages)
        scenes = sum(s.steps for s in word_stages) * size
        sources["words"] = WordBatches(word_targets(processor, scenes, recipe.seed), size)
    caption_steps = sum(s.steps for s in recipe.stages if s.data == "captions")
    if caption_steps:
        captions = caption_samples(caption_steps * recipe.batch_size, recipe.seed)
        sources["captions"] = Batches(processor, encode_samples(processor, captions), recipe.batch_size, recipe.seed)
    return sources


class Batches:
    """Shuffled training batches, an epoch after another (deterministic for a seed).

    Batches are bucketed by length: each pool of `pool` batches' worth of shuffled samples is sorted by length
    before it is cut into batches, so a batch pads to a similar length (mc questions are ~70 tokens, the
    others ~40). Right padding is pure waste for a CPU: this cuts a step's tokens by about a third.
    """

    def __init__(self, processor: VLMProcessor, encoded: list[dict], batch_size: int, seed: int, pool: int = 8):
        if len(encoded) < batch_size:
            raise ValueError(f"{len(encoded)} training samples cannot fill one batch of {batch_size}")
        self.processor, self.encoded, self.batch_size, self.pool = processor, encoded, batch_size, pool
        self.rng = random.Random(seed)
        self.batches: list[list[int]] = []

    def new_epoch(self) -> None:
        order = list(range(len(self.encoded)))
        self.rng.shuffle(order)
        size = self.batch_size * self.pool
        batches = []
        for start in range(0, len(order) - self.batch_size + 1, size):
            chunk = sorted(order[start:start + size], key=lambda i: len(self.encoded[i]["input_ids"]))
            batches += [chunk[k:k + self.batch_size] for k in range(0, len(chunk) - self.batch_size + 1,
                                                                     self.batch_size)]
        self.rng.shuffle(batches)
        self.batches = batches

    def next(self) -> dict:
        if not self.batches:
            self.new_epoch()
        return collate(self.processor, [self.encoded[i] for i in self.batches.pop()])


# ----------------------------------------------------------------------------------------------
# Training


def lr_factor(step: int, stage: Stage) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < stage.warmup_steps:
        return (step + 1) / stage.warmup_steps
    progress = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: VisionLanguageModel, stage: Stage) -> torch.optim.Optimizer:
    """One AdamW group per component, chosen by module (never by parameter name: 'proj' also matches q_proj)."""
    groups = [("projector", list(model.projector.parameters()), stage.lr_projector),
              ("vision", list(model.vision.parameters()), stage.lr_vision),
              ("lora", lora_parameters(model), stage.lr_lora)]
    param_groups = []
    for name, params, lr in groups:
        for p in params:
            p.requires_grad_(lr > 0)
        if lr > 0:
            param_groups.append({"name": name, "params": params, "lr": lr, "base_lr": lr})
    return torch.optim.AdamW(param_groups, betas=(0.9, 0.95), weight_decay=0.0)


def train(model, batches: Batches | dict[str, Batches], recipe: DemoRecipe, progress: bool = True,
          log_every: int = 0) -> list[dict]:
    """Run the recipe's stages; returns one record per step (stage, step, loss, seconds).

    `batches`: one source for every stage, or {stage.data: source} (e.g. {"captions": ..., "qa": ...}).

    log_every > 0 also prints a plain line every that many steps (for logs, where a tqdm bar is unreadable).
    """
    history, start = [], time.perf_counter()
    model.train()
    step = 0
    bar = tqdm(total=recipe.total_steps, desc="training", disable=not progress)
    for stage in recipe.stages:
        if stage.fit == "least_squares":
            error = fit_projector_to_words(model, batches.pop(stage.name))  # then free the scenes (~0.5 GB)
            history.append({"stage": stage.name, "step": step, "loss": error, "grad_norm": 0.0,
                            "seconds": time.perf_counter() - start})
            print(f"[{stage.name}] projector solved by least squares on {stage.scenes} scenes: relative squared "
                  f"error {error:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
            continue
        optimizer = make_optimizer(model, stage)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for i in range(stage.steps):
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(i, stage)
            batch = (batches[stage.data] if isinstance(batches, dict) else batches).next()
            if stage.data == "words":
                loss = word_loss(model, batch, batch.get("vocabulary"))
            else:
                with compute_autocast(model):
                    loss = answer_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            record = {"stage": stage.name, "step": step, "loss": loss.item(), "grad_norm": float(grad_norm),
                      "seconds": time.perf_counter() - start}
            history.append(record)
            bar.set_postfix(stage=stage.name, loss=f"{record['loss']:.3f}")
            bar.update(1)
            if log_every and (step % log_every == 0 or step == 1):
                print(f"step {step:4d} [{stage.name}] loss {record['loss']:.3f} grad-norm {record['grad_norm']:.2f} "
                      f"{record['seconds']:.0f} s", flush=True)
    bar.close()
    model.eval()
    return history


# ----------------------------------------------------------------------------------------------
# Evaluation


def score(subset: str, prediction: str, answer: str) -> float:
    """mc: the letter, as MMStar's scorer reads it; other subsets: exact match after VQA normalisation."""
    if subset == "mc":
        return mmstar_match(prediction, answer)
    return float(normalize_answer(prediction) == normalize_answer(answer))


@torch.no_grad()
def evaluate(model, processor: VLMProcessor, samples: list[dict], batch_size: int, max_new_tokens: int,
             desc: str = "evaluating", progress: bool = True) -> tuple[dict[str, float], list[dict]]:
    """Greedy answers for every sample; returns (accuracy per subset, per-sample records)."""
    from .vlm import answer

    model.eval()
    records = []
    for i in tqdm(range(0, len(samples), batch_size), desc=desc, disable=not progress):
        chunk = samples[i:i + batch_size]
        with compute_autocast(model):
            predictions = answer(model, processor, [s["image"] for s in chunk], [s["question"] for s in chunk],
                                 max_new_tokens=max_new_tokens)
        for s, p in zip(chunk, predictions):
            records.append({**s, "prediction": p, "correct": score(s["subset"], p, s["answer"])})
    accuracy = {}
    for subset in dict.fromkeys(s["subset"] for s in samples):
        scores = [r["correct"] for r in records if r["subset"] == subset]
        accuracy[subset] = sum(scores) / len(scores)
    return accuracy, records


def count_label_of(question: str) -> str:
    """Which count token answers a mini-cauldron counting question: the shape's plural or the colour it names, else
    "objects" ("How many red objects are there?" -> "red"; "Count the squares." -> "squares")."""
    from .counting import count_labels

    words = question.lower().replace("?", " ").replace(".", " ").split()
    named = [label for label in count_labels()[:-1] if label in words]
    return named[0] if named else "objects"


@torch.no_grad()
def tally_accuracy(model, processor: VLMProcessor, samples: list[dict], batch_size: int = 50) -> float | None:
    """How often the image side's own tally (the count token the question needs) is the right answer, on the
    counting samples: the ceiling of the decoder's count accuracy. None without count tokens or count samples."""
    counter = model.projector.counter
    samples = [s for s in samples if s["subset"] == "count"]
    if counter is None or not samples:
        return None
    right = 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        pixels = processor.preprocess_images([s["image"] for s in chunk]).to(next(model.parameters()).device)
        with compute_autocast(model):
            tallies = counter.tallies(model.projector.block_tokens(model.vision(pixels)))
        for s, row in zip(chunk, tallies.tolist()):
            right += row[counter.labels.index(count_label_of(s["question"]))] == int(s["answer"])
    return right / len(samples)


def with_other_images(samples: list[dict]) -> list[dict]:
    """The same questions, each with another scene's image: within a subset, question i gets the image of the next
    sample that shows a different scene (the batch rolled by one; the two questions of a two-turn row share their
    scene, so that one is skipped). An answer that was read from the picture should now fall to chance."""
    out = []
    for subset in dict.fromkeys(s["subset"] for s in samples):
        group = [s for s in samples if s["subset"] == subset]
        for i, s in enumerate(group):
            others = (group[(i + k) % len(group)]["image"] for k in range(1, len(group)))
            image = next((im for im in others if im is not s["image"]), s["image"])
            out.append({**s, "image": image})
    return out


def summary_line(before: dict, after: dict, other: dict, train_minutes: float) -> str:
    """One line for the room: per subset before -> after (with another image; chance)."""
    parts = [f"{k} {before[k]:.2f}->{after[k]:.2f} (other image {other[k]:.2f}, chance {CHANCE.get(k, 0):.2f})"
             for k in after]
    return f"demo: {'; '.join(parts)} | train {train_minutes:.1f} min | {os.cpu_count() or 1} cores"


# ----------------------------------------------------------------------------------------------
# Figures


def save_figures(out: Path, history: list[dict], before: dict, after: dict, records: list[dict]) -> list[Path]:
    from matplotlib.figure import Figure

    paths = []
    # Loss curve, one colour per stage, plus a running mean.
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.add_subplot()
    window = 10
    for k, stage in enumerate(dict.fromkeys(h["stage"] for h in history)):
        pts = [h for h in history if h["stage"] == stage]
        ax.plot([h["step"] for h in pts], [h["loss"] for h in pts], lw=0.8, alpha=0.5, label=f"{stage} (per step)")
        # The running mean stays within a stage: a caption loss and an answer loss are different objectives.
        smooth = [sum(h["loss"] for h in pts[max(0, i - window + 1):i + 1]) / min(i + 1, window)
                  for i in range(len(pts))]
        ax.plot([h["step"] for h in pts], smooth, color="black", lw=1.5, label=f"mean of {window}" if k == 0 else None)
    ax.set(xlabel="step", ylabel="answer loss", title="Training loss", yscale="log")
    ax.legend()
    paths.append(out / "loss_curve.png")
    fig.savefig(paths[-1], bbox_inches="tight")

    # Before / after accuracy per subset.
    fig = Figure(figsize=(6, 3.5), dpi=110)
    ax = fig.add_subplot()
    names = list(after)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [before[n] for n in names], 0.4, label="before", color="#bbbbbb")
    ax.bar([x + 0.2 for x in xs], [after[n] for n in names], 0.4, label="after", color="#3a76c4")
    for x, n in zip(xs, names):
        ax.hlines(CHANCE.get(n, 0), x - 0.4, x + 0.4, colors="red", linestyles="dotted")
        ax.text(x + 0.2, after[n] + 0.01, f"{after[n]:.2f}", ha="center", fontsize=8)
    ax.set(xticks=list(xs), xticklabels=names, ylim=(0, 1.05), ylabel="held-out accuracy",
           title="Before vs after training (dotted: chance)")
    ax.legend(loc="lower right")
    paths.append(out / "before_after.png")
    fig.savefig(paths[-1], bbox_inches="tight")

    # Sample gallery: a few held-out images per subset with the question, gold answer and the model's.
    picks = []
    for subset in names:
        picks += [r for r in records if r["subset"] == subset][:3]
    cols = 6
    rows = math.ceil(len(picks) / cols)
    fig = Figure(figsize=(cols * 2.3, rows * 3.0), dpi=100)
    for k, r in enumerate(picks):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(r["image"], interpolation="nearest")
        ax.set_axis_off()
        question = r["question"].split("\n")[0]
        mark = "ok" if r["correct"] else "WRONG"
        ax.set_title(f"{question[:34]}\ngold: {r['answer']} | model: {r['prediction'][:14]} ({mark})", fontsize=6.5,
                     color="black" if r["correct"] else "red")
    paths.append(out / "samples.png")
    fig.savefig(paths[-1], bbox_inches="tight")
    return paths


# ----------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(model: VisionLanguageModel, out: Path, recipe: DemoRecipe) -> Path:
    """The trained weights: ViT, projector and LoRA adapters (safetensors), with the recipe and model config.

    The 4-bit base is not saved: it is the public SmolLM2-135M-Instruct, rebuilt by `build_model`; nor is a ViT that
    no stage trained (it is recipe.vision_weights, in assets/).
    """
    from safetensors.torch import save_file

    folder = out / "checkpoint"
    tmp = out / ".checkpoint-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    state = {}
    if any(s.lr_vision > 0 for s in recipe.stages) or not recipe.vision_weights:  # else: recipe.vision_weights
        state.update({f"vision.{k}": v for k, v in model.vision.state_dict().items()})
    state.update({f"projector.{k}": v for k, v in model.projector.state_dict().items()})
    state.update({f"decoder.{n}": p for n, p in model.decoder.named_parameters() if "lora_" in n})
    # float16: half the size (the committed copy is ~14 MB) and exact enough: assets/demo_checkpoint, reloaded,
    # gives the figures docs/demo_findings.md reports.
    save_file({k: v.detach().half().contiguous() for k, v in state.items()}, tmp / "trainable.safetensors")
    model.config.save(tmp / "config.json")
    with open(tmp / "recipe.json", "w") as f:
        json.dump(asdict(recipe), f, indent=2)
    # Swap in the new folder without a moment where neither exists: the old one is renamed aside first
    # (a crash right then leaves it whole, as .checkpoint-old), and deleted only once the new one is in place.
    old = out / ".checkpoint-old"
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


# ----------------------------------------------------------------------------------------------
# The demo


def with_image_layout(model: VisionLanguageModel, recipe: DemoRecipe, pretrained: bool = True) -> VisionLanguageModel:
    """The recipe's image side on a profile's model: the recipe's ViT (if `pretrained`; the random `tiny` profile
    keeps its own) at recipe.image_size (position embeddings resampled), a fresh projector for the recipe's
    shuffle factor and tokens per block, and the prompt layout."""
    from .config import ProjectorConfig, VLMConfig
    from .projector import ModalityProjector
    from .vision import VisionEncoder

    config = model.config
    if recipe.vision_weights and pretrained:
        path = Path(recipe.vision_weights)
        if not path.is_absolute() and not path.exists():
            from .weights import assets_dir

            path = assets_dir() / path
        model.vision = VisionEncoder.from_siglip(path)
    if model.vision.cfg.image_size != recipe.image_size:
        model.vision = model.vision.resized(recipe.image_size)
    config.vision = model.vision.cfg
    from .counting import count_labels

    config.projector = ProjectorConfig(shuffle_factor=recipe.shuffle_factor, kind=config.projector.kind,
                                       tokens_per_block=recipe.tokens_per_block, bias=recipe.projector_bias,
                                       count_labels=count_labels() if recipe.count_tokens else ())
    config.image_layout = recipe.image_layout
    VLMConfig.from_dict(config.to_dict())  # validates the combination (grid divisible by the shuffle factor)
    model.projector = ModalityProjector(config.projector, config.vision.hidden_size, config.decoder.hidden_size)
    return model


def build_model(profile: str, recipe: DemoRecipe) -> tuple[VisionLanguageModel, VLMProcessor]:
    prof = get_profile(profile)
    model = with_image_layout(VisionLanguageModel.from_profile(prof), recipe, pretrained=prof.vision_weights is not None)
    processor = VLMProcessor.from_config(model.config, system_prompt=recipe.system_prompt)
    if model.projector.counter is not None:  # the counter's word tables: rows of the decoder's embeddings
        model.projector.counter.set_words(model.decoder.embed_tokens, lambda word: processor.text_ids(word)[0])
    make_qlora(model, recipe)
    return model, processor


def run_demo(profile: str = "smol", recipe: DemoRecipe | None = None, out: str | Path = "runs/demo",
             progress: bool = True, log_every: int = 0) -> dict:
    recipe = recipe or DemoRecipe()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    print(f"demo: profile {profile}, {torch.get_num_threads()} CPU threads, output in {out}/")
    t0 = time.perf_counter()
    model, processor = build_model(profile, recipe)
    train_samples = load_samples("train", recipe.subsets, recipe.train_per_subset)
    test_samples = load_samples("test", recipe.subsets, recipe.eval_per_subset)
    encoded = encode_samples(processor, train_samples)
    trainable = sum(p.numel() for p in model.vision.parameters()) + sum(p.numel() for p in model.projector.parameters())
    trainable += sum(p.numel() for p in lora_parameters(model))
    print(f"model ready in {time.perf_counter() - t0:.0f} s: {len(train_samples)} training samples, "
          f"{len(test_samples)} held-out; trainable {trainable / 1e6:.2f}M (ViT + projector + LoRA r={recipe.lora_r})")

    before, _ = evaluate(model, processor, test_samples, recipe.eval_batch_size, recipe.max_new_tokens,
                         desc="before training", progress=progress)
    print("before: " + "  ".join(f"{k} {v:.2f}" for k, v in before.items()))

    t_train = time.perf_counter()
    history = train(model, training_batches(processor, encoded, recipe), recipe, progress, log_every)
    train_minutes = (time.perf_counter() - t_train) / 60

    tallies = tally_accuracy(model, processor, test_samples)
    if tallies is not None:
        print(f"count tokens: the image side's tally is right for {tallies:.2f} of the held-out count questions "
              "(the ceiling of count accuracy)")
    after, records = evaluate(model, processor, test_samples, recipe.eval_batch_size, recipe.max_new_tokens,
                              desc="after training", progress=progress)
    print("after:  " + "  ".join(f"{k} {v:.2f}" for k, v in after.items()))
    other, _ = evaluate(model, processor, with_other_images(test_samples), recipe.eval_batch_size,
                        recipe.max_new_tokens, desc="with other images", progress=progress)
    print("other image: " + "  ".join(f"{k} {v:.2f} (chance {CHANCE.get(k, 0):.2f})" for k, v in other.items()))
    print("sample answers (held-out):")
    for subset in after:
        for r in [r for r in records if r["subset"] == subset][:2]:
            q = r["question"].replace("\n", " | ")
            print(f"  [{subset}] {q[:70]!r} -> {r['prediction']!r} (gold {r['answer']!r})")

    figures = save_figures(out, history, before, after, records)
    checkpoint = save_checkpoint(model, out, recipe)
    result = {"profile": profile, "before": before, "after": after, "other_image": other, "chance": CHANCE,
              "count_tally_accuracy": tallies,
              "train_minutes": train_minutes,
              "threads": torch.get_num_threads(), "history": history, "recipe": asdict(recipe),
              "figures": [str(p) for p in figures], "checkpoint": str(checkpoint)}
    with open(out / "results.json", "w") as f:
        json.dump(result, f, indent=2)
    print(f"figures: {', '.join(str(p) for p in figures)}; checkpoint: {checkpoint}")
    print(summary_line(before, after, other, train_minutes))
    return result


def demo_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_course demo", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="smol", help="smol (default) or tiny (tests)")
    parser.add_argument("--quick", action="store_true", help="a few steps on a few rows: checks the pipeline")
    parser.add_argument("--out", default="runs/demo", help="where figures, results.json and the checkpoint go")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    recipe = DemoRecipe()
    if args.quick:
        recipe = quick_recipe(recipe)
    run_demo(args.profile, recipe, args.out, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(demo_main())
