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

The classifiers are linear, like the heads the demo's ViT was pretrained with (`vlm_course.pretrain_blocks`), and
fitted in a minute on frozen features (`fit_count_heads`: logistic regression, no decoder pass). Adding up
probabilities rather than counting each block's most likely class lets an object that two blocks each half claim
count once (docs/demo_findings.md section 14 measures both). A block holds one object: where two centres fall in
one block (about 5% of the mini-cauldron's count scenes) the tally is one short. No gradient flows through a
count (the rounding is not differentiable); the ViT and projector are frozen when the decoder learns to read them.
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


class CountTokens(nn.Module):
    """Block vectors (B, blocks, block width) -> one token per count label (B, labels, D): each tally's digit."""

    def __init__(self, labels: tuple[str, ...], block_width: int, hidden_size: int):
        super().__init__()
        known = count_labels()
        unknown = [label for label in labels if label not in known]
        if unknown:
            raise ValueError(f"count labels {unknown} are not among what the counter can count: {list(known)}")
        self.labels = tuple(labels)
        self.colour_head = nn.Linear(block_width, 1 + len(synthetic.COLOURS))
        self.shape_head = nn.Linear(block_width, 1 + len(synthetic.SHAPES))
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
                    steps: int = 500, batch_size: int = 4096, lr: float = 1e-2, weight_decay: float = 1e-4,
                    seed: int = 0, progress: bool = False) -> dict[str, float]:
    """Fit the counter's two classifiers by logistic regression on frozen block vectors.

    blocks (N, blocks, width): the ViT's pixel-shuffled output; colour, shape (N, blocks): each block's class
    (NO_OBJECT, or 1 + index in synthetic.COLOURS / SHAPES; `pretrain_blocks.block_labels` gives them). The inputs
    are standardised while fitting (one learning rate suits every feature) and the scaling folded into the heads
    afterwards, so the counter reads raw block vectors. Returns each head's accuracy on the blocks it was fitted on.
    """
    x = blocks.reshape(-1, blocks.shape[-1]).float()
    if len(x) != colour.numel() or len(x) != shape.numel():
        raise ValueError(f"{len(x)} blocks but {colour.numel()} colour and {shape.numel()} shape labels: one each")
    mean, std = x.mean(0), x.std(0) + 1e-4
    x = (x - mean).div_(std)  # one float32 copy of the blocks (6000 scenes: ~370 MB)
    generator = torch.Generator().manual_seed(seed)
    accuracy = {}
    for name, head, y in (("colour", counter.colour_head, colour), ("shape", counter.shape_head, shape)):
        y = y.reshape(-1).long()
        weight = torch.zeros(head.out_features, x.shape[1], requires_grad=True)
        bias = torch.zeros(head.out_features, requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=lr)
        for step in tqdm(range(steps), desc=f"fitting the {name} counter", leave=False, disable=not progress):
            for group in optimizer.param_groups:  # cosine decay: big steps first, a settled fit at the end
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            rows = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=generator)
            loss = F.cross_entropy(x[rows] @ weight.T + bias, y[rows]) + weight_decay * (weight**2).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            head.weight.copy_(weight / std)  # w . (v - mean) / std  ==  (w / std) . v - (w / std) . mean
            head.bias.copy_(bias - (weight / std) @ mean)
            accuracy[name] = float(((x @ weight.T + bias).argmax(-1) == y).float().mean())
    return accuracy
