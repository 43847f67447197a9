"""The offline instructor demo: a real VLM trained on a laptop CPU, offline, in about 25 minutes.

    python -m vlm_course demo            # (or `make demo`) profile smol: ~30 min in all on 2 CPU cores
    python -m vlm_course demo --quick    # a few steps: checks the pipeline end to end
    python -m vlm_course demo --profile tiny --quick    # seconds: random tiny model (tests)

What it does, with no network:
  1. builds the `smol` VLM with the demo's image side: the course ViT pretrained per block (assets/vit_demo, 72 px)
     + pixel shuffle into 3 x 3 blocks, two tokens each, each block's place written in words before its tokens
     + the real SmolLM2-135M-Instruct (from the offline GGUF; converted once, ~25 s);
     + count tokens after the blocks: the image side's tally of each shape, colour and all objects, written as a
     digit's embedding after its label (`vlm_course.counting`);
  2. QLoRA with `vlm_course.training`'s set-up: the decoder's linear layers become 4-bit NF4 (bitsandbytes) and
     get LoRA adapters (peft);
  3. measures the untrained model on the held-out mini-cauldron (shapes, count, position, spatial, mc) with
     `vlm_course.evaluation`'s loop;
  4. trains in two stages (see `DemoRecipe`): the projector solved by least squares onto the decoder's word
     embeddings, then QLoRA on the questions with `vlm_course.training`'s Trainer (the course's one training loop),
     with a tqdm bar and a loss curve;
  5. measures again, with the right image and with another scene's, prints sample answers, saves figures and the
     checkpoint under runs/demo/ (never assets/), and ends with one line of figures.

The committed copy, assets/demo_checkpoint, is this run's output: `python -m vlm_course demo`, then
`cp runs/demo/checkpoint/* runs/demo/results.json runs/demo/*.png assets/demo_checkpoint/`.

The recipe, and why each number is what it is, lives in `DemoRecipe` below. Why one file past 500 lines: an
instructor reads the whole demo here, top to bottom (recipe, data, the projector's fit, the calls into the course's
Trainer and eval loop, figures, checkpoint); the pieces it shares with the lessons live in the library.

Status (measured by `make demo` on an idle 2-core machine, 2026-12-01; 200-268 held-out questions per subset): the
model reads colour/shape, counts and position from the picture: shapes 0.00 -> 0.98, count 0.00 -> 0.86 (the image
side's own tally is right for 0.88), position 0.00 -> 0.96, falling to 0.22, 0.13 and 0.06 (chance 0.20, 0.20,
0.11) with another scene's image; on 200 fresh scenes per subset of seed 20261201: 0.97, 0.86, 0.96. Spatial
relations and lettered options are not learnt: spatial 0.52, mc 0.26 (chance 0.50, 0.25). Training takes 24.5 min
(280 QA steps at ~4.4 s, and 4.3 min of fits), the whole command 29.3 min, peak memory 3.9 GB. The trained weights
are committed in assets/demo_checkpoint; docs/demo_findings.md sections 12-16 have the recipe's measurements.
`--layout idefics3` trains a variant whose image side Idefics3 can express (`idefics3_recipe`), to leave the course
as a SmolVLM checkpoint (`save_as_idefics3`) and run in llama.cpp.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .config import get_profile
from .evaluation import with_other_images
from .processing import VLMProcessor
from .training import TrainConfig
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
    # "qa": the mini-cauldron's questions, trained by vlm_course.training's Trainer. "words" (with
    # fit="least_squares"): fresh scenes whose image tokens are regressed onto the decoder's embeddings of the words
    # that name each block's object (`word_targets`), solved in closed form from `scenes` scenes; no decoder pass.
    data: str = "qa"
    batch_size: int | None = None  # None: the recipe's batch_size
    fit: str = "gradient"  # "gradient": `steps` AdamW steps; "least_squares": the linear projector in closed form
    scenes: int = 0

    def __post_init__(self):
        if (self.data, self.fit) not in (("qa", "gradient"), ("words", "least_squares")):
            raise ValueError(f"stage {self.name!r}: data={self.data!r} with fit={self.fit!r} is not a stage the demo "
                             "runs: use data='qa' (gradient steps) or data='words' with fit='least_squares' (the "
                             "caption and gradient word stages of docs/demo_findings.md were retired)")


@dataclass
class DemoRecipe:
    subsets: tuple[str, ...] = EVAL_SUBSETS
    train_per_subset: int = 2000  # the committed mini-cauldron's train split
    eval_per_subset: int = 200  # the whole held-out split
    # The untrained model is measured on the first 50 held-out rows per subset: it is at or below chance everywhere
    # (0.00-0.23), and the whole split would add 3-4 minutes to `make demo`. None: all eval_per_subset rows.
    before_per_subset: int | None = 50
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
    # The counter's two block classifiers are fitted on this many fresh scenes (half drawn as the words stage draws
    # them, half crowded like the count subset's): 6000 gave tallies right on 0.87 of fresh count questions, 3000
    # on 0.86 (docs/demo_findings.md section 14). Their block vectors are held in float16 while fitting (~190 MB).
    count_scenes: int = 6000
    # The counter's classifiers read each block with its four neighbours through a hidden layer of this width
    # (tally right on 0.89-0.90 of fresh count questions, against 0.86 for linear ones on the block alone, which
    # 0 gives; docs/demo_findings.md section 15). Fitting them takes 1-2 minutes on 2 cores.
    counter_hidden: int = 128
    stages: tuple[Stage, ...] = field(default_factory=lambda: (
        # Stage 1 makes the image tokens speak the decoder's language: each block's two tokens are regressed onto
        # the embeddings of " red" " circle" (or " no" " object"), in closed form. No decoder pass: ~2 min.
        Stage("words", steps=0, lr_projector=0.0, lr_vision=0.0, lr_lora=0.0, warmup_steps=0, data="words",
              fit="least_squares", scenes=16_000),
        # Stage 2, QLoRA on the questions: ~20 min at ~4.4 s per step on 2 cores. 240 steps left position at 0.84
        # in one run; these 280 gave 0.96 (docs/demo_findings.md section 16).
        Stage("qlora", steps=280, lr_projector=0.0, lr_vision=0.0, lr_lora=1e-3, warmup_steps=10),
    ))
    max_new_tokens: int = 4  # every answer is 1-2 tokens + <|im_end|>
    eval_batch_size: int = 50
    seed: int = 0

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)


# Recipe fields added after checkpoints were committed, with the value that rebuilds those checkpoints' model.
RECIPE_KEYS_ADDED_LATER = {"count_tokens": False, "count_scenes": 0, "counter_hidden": 0, "before_per_subset": None}


def idefics3_recipe(recipe: DemoRecipe | None = None) -> DemoRecipe:
    """The demo's recipe with an image side Idefics3 (SmolVLM) can express, so the trained model can be saved with
    `save_idefics3` and run in llama.cpp (`save_as_idefics3`): Idefics3's prompt layout (the nine block tokens
    wrapped in <fake_token_around_image><global-img> ... <fake_token_around_image>, no place words), one token per
    block (the least-squares fit regresses it onto the mean of the block's two word embeddings), no projector bias
    and no count tokens. The model must then read a block's place from its position in the run of tokens and count
    by itself: the figures are lower than the main recipe's (docs/demo_findings.md section 17)."""
    return replace(recipe or DemoRecipe(), image_layout="idefics3", tokens_per_block=1, projector_bias=False,
                   count_tokens=False, counter_hidden=0, count_scenes=0)


def quick_recipe(recipe: DemoRecipe) -> DemoRecipe:
    """A few steps of each stage on a handful of rows: checks the pipeline, learns nothing."""
    stages = tuple(replace(s, steps=3 if s.fit == "gradient" else 0, warmup_steps=1, scenes=min(s.scenes, 64))
                   for s in recipe.stages)
    return replace(recipe, stages=stages, train_per_subset=16, eval_per_subset=8, batch_size=4, eval_batch_size=16,
                   count_scenes=min(recipe.count_scenes, 64))


# ----------------------------------------------------------------------------------------------
# QLoRA and the training loop: vlm_course.training's, driven by the recipe


def train_config(recipe: DemoRecipe, stage: Stage | None = None, output_dir: str | Path = "runs/demo/train",
                 progress: bool = True, log_every: int = 0) -> TrainConfig:
    """The recipe (and one of its gradient stages) as a `vlm_course.training.TrainConfig`: what the Trainer runs.

    QLoRA as SmolVLM's fine-tuning notebook sets it up: the decoder's blocks in 4-bit NF4 with LoRA on every linear
    layer, the other frozen weights in the compute dtype (`frozen_dtype="compute"`: bf16 where the CPU has it).
    A component trains in a stage when its learning rate there is above 0. AdamW with betas (0.9, 0.95) and no
    weight decay (a 200-step run), warmup then cosine to 10% of the peak, gradients clipped at 1, batches of
    similar length (`group_by_length`: a third fewer padded tokens per step).
    """
    stage = stage or next((s for s in recipe.stages if s.fit == "gradient"), Stage("setup", 1, 0.0, 0.0, 0.0, 0))
    return TrainConfig(
        vision="full" if stage.lr_vision > 0 else "frozen", projector="full" if stage.lr_projector > 0 else "frozen",
        decoder="qlora", lora_r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
        lora_targets=recipe.lora_targets, double_quant=recipe.double_quant, frozen_dtype="compute",
        precision=recipe.precision, lr_projector=stage.lr_projector, lr_vision=stage.lr_vision,
        lr_lora=stage.lr_lora, weight_decay=0.0, adam_betas=(0.9, 0.95), min_lr_ratio=0.1,
        warmup_fraction=stage.warmup_steps / stage.steps, max_grad_norm=1.0,
        batch_size=stage.batch_size or recipe.batch_size, max_steps=stage.steps, group_by_length=8,
        seed=recipe.seed, output_dir=str(output_dir), progress=progress, log_every=log_every)


def compute_autocast(model: VisionLanguageModel) -> torch.autocast:
    """bf16 autocast if the QLoRA set-up chose bf16 compute for this model (its embeddings say so), else a no-op."""
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


def as_rows(samples: list[dict]) -> list[dict]:
    """Samples back in the_cauldron's schema, one turn each: what the Trainer and the eval loop read."""
    return [{"images": [s["image"]], "texts": [{"user": s["question"], "assistant": s["answer"]}],
             "source": s["subset"]} for s in samples]


def block_words(shapes, side: int = 3) -> list[str]:
    """Two words per block of a side x side grid, row by row: the colour and shape of the object whose centre
    lies in the block (" red", " circle"), or " no", " object" (`pretrain_blocks.block_objects` decides)."""
    from .pretrain_blocks import block_objects

    words = []
    for s in block_objects(shapes, side):
        words += [f" {s.colour}", f" {s.shape}"] if s is not None else [" no", " object"]
    return words


def word_targets(processor: VLMProcessor, n: int, seed: int, progress: bool = False,
                 side: int | None = None) -> dict[str, torch.Tensor]:
    """n fresh scenes (never the mini-cauldron's seeds) as pixel values (float16) and the ids of each block's words.
    side: the grid of blocks the words name; None, the config's pixel-shuffled grid (a connector without a pixel
    shuffle, such as a perceiver's queries, can still be fitted to the 3 x 3 blocks with side=3)."""
    import numpy as np

    from .data import synthetic
    from .pretrain_blocks import SCENE_SIZE, random_scene

    config = processor.config
    if config.projector.tokens_per_block not in (1, 2):
        raise ValueError("word targets name each block with two words, for one or two tokens per block: use "
                         f"tokens_per_block=1 or 2, not {config.projector.tokens_per_block}")
    rng = np.random.default_rng([seed, 11])
    pixels, ids = [], []
    for _ in tqdm(range(n), desc="drawing scenes", leave=False, disable=not progress):
        shapes = random_scene(rng)
        pixels.append(processor.image_transform(synthetic.render(rng, SCENE_SIZE, shapes)).half())
        ids.append([processor.text_ids(w)[0] for w in block_words(shapes, side or config.block_grid_size)])
    return {"pixel_values": torch.stack(pixels), "word_ids": torch.tensor(ids)}


def word_embeddings(model: VisionLanguageModel, word_ids: torch.Tensor) -> torch.Tensor:
    """(n, 2 x blocks) word ids -> the (n, blocks x tokens_per_block, D) embeddings each block's tokens should take:
    the two words' own embeddings (two tokens per block), or their mean (one token per block, as Idefics3's
    connector writes: one vector carrying both words)."""
    embeds = model.decoder.embed_tokens(word_ids).float()
    if model.projector.cfg.tokens_per_block == 1:
        embeds = embeds.unflatten(1, (-1, 2)).mean(2)
    return embeds


@torch.no_grad()
def fit_projector_to_words(model: VisionLanguageModel, data: dict[str, torch.Tensor], ridge: float = 1e-2,
                           chunk: int = 500) -> float:
    """Solve the linear projector in closed form: the weights W minimising ||X W - Y||^2 + ridge ||W||^2, where X
    holds the frozen ViT's pixel-shuffled block vectors (plus a 1 for the bias) and Y the embeddings of the
    block's two words side by side (or their mean, for one token per block: `word_embeddings`). Seconds instead
    of minutes of gradient steps, and a lower error (0.05 relative squared error against 0.45 after 150 AdamW
    steps: docs/demo_findings.md). Returns that training error."""
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
        y = word_embeddings(model, data["word_ids"][i:i + chunk]).reshape(len(x), -1)
        gram += x.double().T @ x.double()
        cross += x.double().T @ y.double()
    solution = torch.linalg.solve(gram + ridge * torch.eye(width, dtype=torch.float64), cross).float()
    proj.weight.copy_(solution[:proj.in_features].T)
    if proj.bias is not None:
        proj.bias.copy_(solution[-1])
    tokens = model.projector.block_tokens(model.vision(data["pixel_values"][:chunk].float())).float()
    targets = word_embeddings(model, data["word_ids"][:chunk])
    return float((((tokens - targets) ** 2).sum(-1) / (targets**2).sum(-1)).mean())


@torch.no_grad()
def count_targets(model: VisionLanguageModel, processor: VLMProcessor, n: int, seed: int,
                  progress: bool = False) -> dict[str, torch.Tensor]:
    """n fresh scenes for the counter: each block's vector (the frozen ViT's, pixel-shuffled, float16) and the
    colour and shape class of the object whose centre lies in it. Every other scene is crowded like the count
    subset's (up to five small objects, colours and shapes repeated); the rest are drawn as the words stage's."""
    import numpy as np

    from .data import synthetic
    from .pretrain_blocks import SCENE_SIZE, block_labels, random_scene

    rng = np.random.default_rng([seed, 13])
    side = processor.config.block_grid_size
    blocks, colours, shapes_ = [], [], []
    chunk = 250
    for start in tqdm(range(0, n, chunk), desc="drawing scenes for the counter", leave=False, disable=not progress):
        images = []
        for i in range(start, min(n, start + chunk)):
            if i % 2:
                shapes, _ = synthetic.count_scene(rng, SCENE_SIZE, 1 + i // 2 % synthetic.MAX_COUNT)
            else:
                shapes = random_scene(rng)
            images.append(synthetic.render(rng, SCENE_SIZE, shapes))
            colour, shape = block_labels(shapes, side)
            colours.append(torch.from_numpy(colour))
            shapes_.append(torch.from_numpy(shape))
        pixels = processor.preprocess_images(images).to(next(model.parameters()).device)
        blocks.append(model.projector.blocks(model.vision(pixels)).half().cpu())
    return {"blocks": torch.cat(blocks), "colour": torch.stack(colours), "shape": torch.stack(shapes_)}


def fit_counter(model: VisionLanguageModel, processor: VLMProcessor, n: int, seed: int,
                progress: bool = False) -> dict[str, float]:
    """Fit the count tokens' block classifiers (`counting.fit_count_heads`) on n fresh scenes; returns their
    accuracy per block on those scenes."""
    from .counting import fit_count_heads

    data = count_targets(model, processor, n, seed, progress)
    return fit_count_heads(model.projector.counter, data["blocks"], data["colour"], data["shape"], seed=seed,
                           progress=progress)


# ----------------------------------------------------------------------------------------------
# Training: the projector in closed form, then vlm_course.training's Trainer for each gradient stage


def train(model, processor: VLMProcessor, train_samples: list[dict], recipe: DemoRecipe, out: Path,
          progress: bool = True, log_every: int = 0) -> list[dict]:
    """Run the recipe's stages; returns one record per step (stage, step, loss, grad_norm, seconds).

    A least-squares stage solves the projector from fresh scenes (`fit_projector_to_words`); a gradient stage is
    one `vlm_course.training.Trainer` run on the mini-cauldron's questions, in out/train/<stage>/ (its
    checkpoint and loss curve; cleared first, so a new demo never resumes an old one by accident).
    """
    from .training import Trainer

    history, start, done = [], time.perf_counter(), 0
    rows = as_rows(train_samples)
    for stage in recipe.stages:
        if stage.fit == "least_squares":
            error = fit_projector_to_words(model, word_targets(processor, stage.scenes, recipe.seed))
            history.append({"stage": stage.name, "step": done, "loss": error, "grad_norm": 0.0,
                            "seconds": time.perf_counter() - start})
            print(f"[{stage.name}] projector solved by least squares on {stage.scenes} scenes: relative squared "
                  f"error {error:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
            if model.projector.counter is not None and recipe.count_scenes:
                fitted = fit_counter(model, processor, recipe.count_scenes, recipe.seed, progress)
                print(f"[{stage.name}] counter fitted on {recipe.count_scenes} scenes: blocks right, colour "
                      f"{fitted['colour']:.3f}, shape {fitted['shape']:.3f} ({time.perf_counter() - start:.0f} s)",
                      flush=True)
            continue
        folder = out / "train" / stage.name
        shutil.rmtree(folder, ignore_errors=True)
        trainer = Trainer(model, processor, rows, train_config(recipe, stage, folder, progress, log_every))
        trainer.fit()
        for record in trainer.history["train"]:
            history.append({"stage": stage.name, "step": done + record["step"], "loss": record["loss"],
                            "grad_norm": record["grad_norm"], "seconds": record["seconds"]})
        done += stage.steps
    model.eval()
    return history


# ----------------------------------------------------------------------------------------------
# Evaluation: vlm_course.evaluation's loop and scores, with the right image and with another scene's


def evaluate(model, processor: VLMProcessor, samples: list[dict], batch_size: int, max_new_tokens: int,
             desc: str = "evaluating", progress: bool = True) -> tuple[dict[str, float], list[dict]]:
    """Greedy answers for every sample (`vlm_course.evaluation.evaluate`: exact match after VQA normalisation,
    MMStar's letter rule for mc); returns (accuracy per subset, per-sample records)."""
    from .evaluation import evaluate as evaluate_rows

    with compute_autocast(model):
        result = evaluate_rows(model, processor, as_rows(samples), batch_size=batch_size,
                               max_new_tokens=max_new_tokens, progress=progress, desc=desc)
    records = [{**s, "prediction": r.prediction, "correct": r.score} for s, r in zip(samples, result.records)]
    return result.by_subset, records


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
            tallies = counter.tallies(model.projector.blocks(model.vision(pixels)))
        for s, row in zip(chunk, tallies.tolist()):
            right += row[counter.labels.index(count_label_of(s["question"]))] == int(s["answer"])
    return right / len(samples)


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
                                       count_labels=count_labels() if recipe.count_tokens else (),
                                       counter_hidden_size=recipe.counter_hidden if recipe.count_tokens else 0)
    config.image_layout = recipe.image_layout
    VLMConfig.from_dict(config.to_dict())  # validates the combination (grid divisible by the shuffle factor)
    model.projector = ModalityProjector(config.projector, config.vision.hidden_size, config.decoder.hidden_size)
    return model


def build_model(profile: str, recipe: DemoRecipe) -> tuple[VisionLanguageModel, VLMProcessor]:
    prof = get_profile(profile)
    model = with_image_layout(VisionLanguageModel.from_profile(prof), recipe, pretrained=prof.vision_weights is not None)
    processor = VLMProcessor.from_config(model.config, system_prompt=recipe.system_prompt)
    # Idefics3's layout adds <fake_token_around_image> and <end_of_utterance> to the tokenizer: rows for them (the
    # mean of the others, frozen, so a rebuilt model has the same ones and the checkpoint need not carry them)
    if recipe.image_layout == "idefics3":
        model.resize_vocabulary(len(processor.tokenizer))
    if model.projector.counter is not None:  # the counter's word tables: rows of the decoder's embeddings
        model.projector.counter.set_words(model.decoder.embed_tokens, lambda word: processor.text_ids(word)[0])
    from .training import apply_recipe

    apply_recipe(model, train_config(recipe))  # QLoRA: 4-bit decoder blocks + LoRA adapters (the Trainer keeps them)
    return model, processor


def release_freed_memory() -> None:
    """Give the memory training freed back to the system, and keep the evaluation's large buffers out of the heap.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MB), so after training the
    evaluation's tensors come from a fragmented heap: 150 held-out questions after 3 training steps peaked at
    2.73 GB, and at 1.27 GB with this call before them, at the same speed (docs/demo_findings.md sections 15-16).
    Not during training: there every activation would be a fresh mmap, 60% slower per step. Does nothing where the
    C library is not glibc.
    """
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # macOS, Windows: another allocator
        return
    libc.mallopt(-3, 128 * 1024)  # -3 is M_MMAP_THRESHOLD: allocations above 128 kB get their own mapping again
    libc.malloc_trim(0)


def recipe_from_json(path: Path) -> DemoRecipe:
    """A saved recipe.json as a DemoRecipe (fields added since it was written take RECIPE_KEYS_ADDED_LATER)."""
    raw = json.loads(path.read_text())
    known = {f.name for f in fields(DemoRecipe)}
    raw = {**RECIPE_KEYS_ADDED_LATER, **{k: v for k, v in raw.items() if k in known}}
    raw["stages"] = tuple(Stage(**s) for s in raw.get("stages", ()))
    for key in ("subsets", "lora_targets"):
        if key in raw:
            raw[key] = tuple(raw[key])
    return DemoRecipe(**raw)


def load_checkpoint(folder="runs/demo/checkpoint", profile: str = "smol") -> tuple[VisionLanguageModel, VLMProcessor]:
    """(trained model, processor) from the checkpoint `make demo` wrote; the 4-bit base is rebuilt offline."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = folder / "trainable.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"no demo checkpoint in {folder}: run `make demo` first (about 30 min on 2 CPU cores)")
    recipe = recipe_from_json(folder / "recipe.json")
    model, processor = build_model(profile, recipe)
    state = load_file(weights)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k.startswith("projector.") or "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"{folder} does not match the {profile!r} demo model: unexpected {result.unexpected_keys[:4]}, "
                         f"missing {missing[:4]}; was it written by another version of the demo? run `make demo` again")
    return model.eval(), processor


def save_as_idefics3(checkpoint, folder, profile: str = "smol") -> Path:
    """A demo checkpoint trained with `idefics3_recipe` as a transformers Idefics3 folder (`save_idefics3`): the
    LoRA adapters merged into the dequantised 4-bit base, every weight in float32. Loads with
    `transformers.Idefics3ForConditionalGeneration.from_pretrained(folder)` and converts with llama.cpp's own
    script (`vlm_course.deploy.llama_cpp.convert_idefics3`)."""
    from .deploy.merge import merge_lora_adapters

    model, processor = load_checkpoint(checkpoint, profile)
    model = merge_lora_adapters(model).float()  # what is left is what the recipe chose, not the QLoRA set-up
    problems = model.idefics3_problems(processor)
    if problems:
        raise ValueError(f"{checkpoint} was not trained with Idefics3's image side, which cannot express: "
                         + "; ".join(problems) + ". Train one with `python -m vlm_course demo --layout idefics3`")
    return model.save_idefics3(folder, processor)


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
    trainable = sum(p.numel() for p in model.vision.parameters()) + sum(p.numel() for p in model.projector.parameters())
    trainable += sum(p.numel() for p in lora_parameters(model))
    print(f"model ready in {time.perf_counter() - t0:.0f} s: {len(train_samples)} training samples, "
          f"{len(test_samples)} held-out; trainable {trainable / 1e6:.2f}M (ViT + projector + LoRA r={recipe.lora_r})")

    before_samples = test_samples
    if recipe.before_per_subset is not None:
        before_samples = load_samples("test", recipe.subsets, min(recipe.before_per_subset, recipe.eval_per_subset))
    before, _ = evaluate(model, processor, before_samples, recipe.eval_batch_size, recipe.max_new_tokens,
                         desc="before training", progress=progress)
    print(f"before ({len(before_samples)} held-out questions): " + "  ".join(f"{k} {v:.2f}" for k, v in before.items()))

    t_train = time.perf_counter()
    history = train(model, processor, train_samples, recipe, out, progress, log_every)
    train_minutes = (time.perf_counter() - t_train) / 60

    # Measure what was saved: the checkpoint reloaded into a fresh model, the files a learner loads (float16 weights),
    # not the model in memory.
    checkpoint = save_checkpoint(model, out, recipe)
    del model
    release_freed_memory()
    model, processor = load_checkpoint(checkpoint, profile)
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
    result = {"profile": profile, "before": before, "after": after, "other_image": other, "chance": CHANCE,
              "count_tally_accuracy": tallies, "before_questions": len(before_samples),
              "train_minutes": train_minutes, "total_minutes": (time.perf_counter() - t0) / 60,
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
    parser.add_argument("--layout", choices=("grid", "idefics3"), default="grid",
                        help="grid (default): block places in words and count tokens; idefics3: an image side "
                             "Idefics3 can express, for save_as_idefics3 and llama.cpp (idefics3_recipe)")
    parser.add_argument("--out", default=None,
                        help="where figures, results.json and the checkpoint go (runs/demo, or runs/demo_idefics3)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument("--log-every", type=int, default=0, metavar="N",
                        help="also print a plain line every N training steps (for log files)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    recipe = DemoRecipe() if args.layout == "grid" else idefics3_recipe()
    if args.quick:
        recipe = quick_recipe(recipe)
    out = args.out or ("runs/demo" if args.layout == "grid" else "runs/demo_idefics3")
    run_demo(args.profile, recipe, out, progress=not args.no_progress, log_every=args.log_every)
    return 0


if __name__ == "__main__":
    raise SystemExit(demo_main())
