"""Counts written as tokens: the image side tallies the objects, so the decoder only has to copy a number.

Why this exists. After the demo's projector is fitted, each of an image's nine blocks reaches the decoder as two
tokens that sit next to the embeddings of two words: " red" " circle", or " no" " object" for an empty block. To
answer "How many circles are there?" the decoder would have to find every " circle" among eighteen tokens and
add them up. SmolLM2-135M with 200 LoRA steps does not learn that: counting stayed at chance (0.20) in every
recipe docs/demo_findings.md records. Copying a token that follows a label is what small language models learn
first (the same kind of lookup that answers "where is the red circle?" from the block labels).

So the image side counts. `CountTokens` reads each block of the ViT's output (the pixel-shuffled block vector the
projector reads too) with two small classifiers -- which colour is the object whose centre lies in this block, or
none; which shape -- and adds up their probabilities over the nine blocks: the expected number of red objects,
of circles, of objects. Rounded, each tally is written as the embedding of its digit, one token per counted thing,
and the processor writes a label before each of these tokens (" circles" <count> ... " red" <count> ...
" objects" <count>), as the grid layout writes " top left" before a block. The decoder now answers "How many red
objects?" by copying the token after " red" -- and the number still comes from the picture: give it another scene
and the tally changes.

The classifiers are small and fitted in a minute or two on frozen features (`fit_count_heads`: cross-entropy
with Adam, no decoder pass). Two kinds (`ProjectorConfig.counter_hidden_size`):
- linear on the block alone (0), like the heads the demo's ViT was pretrained with (`vlm_course.pretrain_blocks`);
- one hidden layer that reads the block and its four neighbours (a number: the hidden width), a 3 x 3 convolution
  over the block grid in effect. Most of a linear block classifier's mistakes are an object whose centre lies in
  one block but which reaches into the next: seeing the neighbour tells which of the two holds the centre. On
  fresh count scenes the tally is right for 0.89-0.90 of questions against 0.86 (docs/demo_findings.md section 15).
Adding up probabilities rather than counting each block's most likely class lets an object that two blocks each
half claim count once (section 14 measures both). A block holds one object: where two centres fall in one block
(about 5% of the mini-cauldron's count scenes) the tally is one short. No gradient flows through a count (the
rounding is not differentiable); the ViT and projector are frozen when the decoder learns to read them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import synthetic

MAX_COUNT = 9  # one object per block of a 3 x 3 grid: a tally is 0-9, each a single digit token
NO_OBJECT = 0  # class 0 of both classifiers: no object's centre in this block; class 1 + i is COLOURS[i] / SHAPES[i]


def count_labels() -> tuple[str, ...]:
    """What the count tokens count, in the order the processor writes them: each shape (plural), each colour,
    then every object ("circles", ..., "red", ..., "objects"). These are the labels the prompt shows."""
    return (*(f"{s}s" for s in synthetic.SHAPES), *synthetic.COLOURS, "objects")


def label_selectors(labels: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Which classes each label adds up: (labels, 1 + colours) and (labels, 1 + shapes) tables of 0s and 1s.
    "red" sums the colour class red, "circles" the shape class circle, "objects" every colour class but none."""
    colour = torch.zeros(len(labels), 1 + len(synthetic.COLOURS))
    shape = torch.zeros(len(labels), 1 + len(synthetic.SHAPES))
    for i, label in enumerate(labels):
        if label == "objects":
            colour[i, 1:] = 1.0  # every block with an object, whatever its colour
        elif label in synthetic.COLOURS:
            colour[i, 1 + synthetic.COLOURS.index(label)] = 1.0
        else:
            shape[i, 1 + synthetic.SHAPES.index(label[:-1])] = 1.0
    return colour, shape


def neighbourhoods(blocks: torch.Tensor) -> torch.Tensor:
    """(B, side * side, W) -> (B, side * side, 5 W): each block's vector, then the vectors of the blocks above,
    below, left and right of it (zeros beyond the edge of the grid), row by row."""
    batch, n, width = blocks.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} blocks do not form a square grid: the neighbourhood of a block needs side x side blocks")
    grid = F.pad(blocks.reshape(batch, side, side, width), (0, 0, 1, 1, 1, 1))  # a frame of zero blocks
    centre = grid[:, 1:-1, 1:-1]
    up, down = grid[:, :-2, 1:-1], grid[:, 2:, 1:-1]
    left, right = grid[:, 1:-1, :-2], grid[:, 1:-1, 2:]
    return torch.cat([centre, up, down, left, right], dim=-1).reshape(batch, n, 5 * width)


class NeighbourhoodClassifier(nn.Module):
    """Per block: class logits from the block's vector and its four neighbours', through one hidden layer.

    The block vectors are standardised with statistics stored in the module (set by `fit_count_heads`) before the
    neighbourhoods are gathered, so a missing neighbour beyond the edge reads as an average block, not as a
    vector of raw zeros the ViT never writes."""

    def __init__(self, block_width: int, num_classes: int, hidden: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(block_width))
        self.register_buffer("std", torch.ones(block_width))
        self.hidden = nn.Linear(5 * block_width, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        x = (blocks.float() - self.mean) / self.std
        return self.out(F.gelu(self.hidden(neighbourhoods(x))))


class CountTokens(nn.Module):
    """Block vectors (B, blocks, block width) -> one token per count label (B, labels, D): each tally's digit.

    classifier_hidden 0: linear classifiers on each block alone; a number: `NeighbourhoodClassifier`s of that width."""

    def __init__(self, labels: tuple[str, ...], block_width: int, hidden_size: int, classifier_hidden: int = 0):
        super().__init__()
        known = count_labels()
        unknown = [label for label in labels if label not in known]
        if unknown:
            raise ValueError(f"count labels {unknown} are not among what the counter can count: {list(known)}")
        if classifier_hidden < 0:
            raise ValueError(f"classifier_hidden must be 0 (linear) or a hidden width, got {classifier_hidden}")
        self.labels = tuple(labels)

        def head(num_classes: int) -> nn.Module:
            if classifier_hidden:
                return NeighbourhoodClassifier(block_width, num_classes, classifier_hidden)
            return nn.Linear(block_width, num_classes)

        self.colour_head = head(1 + len(synthetic.COLOURS))
        self.shape_head = head(1 + len(synthetic.SHAPES))
        colour, shape = label_selectors(self.labels)
        self.register_buffer("colour_select", colour, persistent=False)  # rebuilt from the labels, never saved
        self.register_buffer("shape_select", shape, persistent=False)
        # The digits' embeddings, filled by set_words from the decoder's table (zeros until then).
        self.register_buffer("digit_words", torch.zeros(MAX_COUNT + 1, hidden_size))

    @torch.no_grad()
    def set_words(self, embed_tokens: nn.Embedding, token_id) -> None:
        """Copy the digits' rows from the decoder's embedding table. token_id(text) -> the id of a one-token
        word (the processor's tokenizer): "0".."9" as an answer starts (no leading space, as the reply begins)."""
        ids = torch.tensor([token_id(str(n)) for n in range(MAX_COUNT + 1)], device=embed_tokens.weight.device)
        self.digit_words.copy_(embed_tokens(ids).to(self.digit_words.dtype))

    def expected_counts(self, blocks: torch.Tensor) -> torch.Tensor:
        """(B, blocks, width) -> (B, labels): the sum over blocks of each label's class probabilities."""
        colour = F.softmax(self.colour_head(blocks).float(), dim=-1).sum(1)  # (B, 1 + colours): expected blocks per class
        shape = F.softmax(self.shape_head(blocks).float(), dim=-1).sum(1)
        return colour @ self.colour_select.T + shape @ self.shape_select.T

    def tallies(self, blocks: torch.Tensor) -> torch.Tensor:
        """(B, blocks, width) -> (B, labels) integer counts: the expected counts, rounded."""
        return torch.round(self.expected_counts(blocks)).clamp(0, MAX_COUNT).long()

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        return self.digit_words[self.tallies(blocks)].to(blocks.dtype)


def fit_count_heads(counter: CountTokens, blocks: torch.Tensor, colour: torch.Tensor, shape: torch.Tensor,
                    steps: int = 500, batch_size: int = 2048, lr: float | None = None, weight_decay: float = 1e-4,
                    seed: int = 0, progress: bool = False) -> dict[str, float]:
    """Fit the counter's two classifiers by cross-entropy (Adam, cosine decay) on frozen block vectors.

    blocks (N, blocks, width): the ViT's pixel-shuffled output (float16 is fine: each batch is made float32);
    colour, shape (N, blocks): each block's class (NO_OBJECT, or 1 + index in synthetic.COLOURS / SHAPES;
    `pretrain_blocks.block_labels` gives them). Each step reads batch_size blocks: whole scenes, as a
    neighbourhood classifier needs a block's neighbours. The inputs are standardised (one learning rate suits every
    feature): a linear head is fitted on standardised vectors and the scaling folded into it afterwards, so it reads
    raw block vectors; a `NeighbourhoodClassifier` keeps the statistics. lr None: 1e-2 for linear heads, 1e-3 for
    neighbourhood classifiers. Returns each head's accuracy on the blocks it was fitted on.
    """
    n, num_blocks, width = blocks.shape
    if n * num_blocks != colour.numel() or n * num_blocks != shape.numel():
        raise ValueError(f"{n * num_blocks} blocks but {colour.numel()} colour and {shape.numel()} shape labels: one each")
    std, mean = torch.std_mean(blocks.reshape(-1, width).float(), dim=0)  # a float32 copy, freed at once
    std = std + 1e-4
    generator = torch.Generator().manual_seed(seed)
    scenes_per_step = max(1, min(n, batch_size // num_blocks))
    accuracy = {}
    for name, head, y in (("colour", counter.colour_head, colour), ("shape", counter.shape_head, shape)):
        y = y.reshape(n, num_blocks).long()
        if isinstance(head, nn.Linear):  # fitted on standardised vectors, then folded back into the head
            fitted = nn.Linear(width, head.out_features)
            nn.init.zeros_(fitted.weight)
            nn.init.zeros_(fitted.bias)
            def logits(rows, fitted=fitted):
                return fitted((blocks[rows].float() - mean) / std)
            matrices = [fitted.weight]
        else:
            head.mean.copy_(mean)
            head.std.copy_(std)
            fitted = head
            def logits(rows, fitted=fitted):
                return fitted(blocks[rows])
            matrices = [fitted.hidden.weight, fitted.out.weight]
        base_lr = lr if lr is not None else (1e-2 if isinstance(head, nn.Linear) else 1e-3)
        frozen = [p for p in fitted.parameters() if not p.requires_grad]  # a frozen projector freezes its counter
        fitted.requires_grad_(True)
        optimizer = torch.optim.Adam(fitted.parameters(), lr=base_lr)
        with torch.enable_grad():
            for step in tqdm(range(steps), desc=f"fitting the {name} counter", leave=False, disable=not progress):
                for group in optimizer.param_groups:  # cosine decay: big steps first, a settled fit at the end
                    group["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                rows = torch.randint(0, n, (scenes_per_step,), generator=generator)
                loss = F.cross_entropy(logits(rows).flatten(0, 1), y[rows].flatten())
                loss = loss + weight_decay * sum((w**2).sum() for w in matrices)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        fitted.zero_grad(set_to_none=True)
        for p in frozen:
            p.requires_grad_(False)
        with torch.no_grad():
            right = sum(int((logits(rows).argmax(-1) == y[rows]).sum()) for rows in torch.arange(n).split(500))
            accuracy[name] = right / y.numel()
            if isinstance(head, nn.Linear):
                head.weight.copy_(fitted.weight / std)  # w . (v - mean) / std  ==  (w / std) . v - (w / std) . mean
                head.bias.copy_(fitted.bias - (fitted.weight / std) @ mean)
    return accuracy
