"""Counts written as tokens: the image side tallies the objects, so the decoder only has to copy a number.

Why this exists. After the demo's projector is fitted, each of an image's nine blocks reaches the decoder as two
tokens that sit next to the embeddings of two words: " red" " circle", or " no" " object" for an empty block. To
answer "How many circles are there?" the decoder would have to find every " circle" among eighteen tokens and
add them up. SmolLM2-135M with 200 LoRA steps does not learn that: counting stayed at chance (0.20) in every
recipe docs/demo_findings.md records. Copying a token that follows a label is what small language models learn
first (the same kind of lookup that answers "where is the red circle?" from the block labels).

So the image side counts. `CountTokens` reads the projector's own block tokens, names each one by its nearest
word (nearest of the colour words + " no", and of the shape words + " object"), tallies the names, and writes
every tally as the embedding of its digit, one token per counted thing. The processor writes a label before each
of these tokens (" circles" <count> " squares" <count> ... " red" <count> ... " objects" <count>), as the grid
layout writes " top left" before a block. The decoder now answers "How many red objects?" by copying the token
after " red" -- and the number still comes from the picture: give it another scene and the tally changes.

There is nothing to train here: the counter's word tables are rows of the decoder's embedding matrix, set once
with `set_words` after the projector is fitted (the nearest-word rule needs the projector to speak in words). A
block holds one object: where two centres fall in one block (about 7% of the mini-cauldron's count scenes) the
tally is one short. No gradient flows through a count (argmin and bincount are not differentiable); the ViT and
projector are frozen when the decoder learns to read the counts.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .data import synthetic

MAX_COUNT = 9  # one object per block of a 3 x 3 grid: a tally is 0-9, each a single digit token


def count_labels() -> tuple[str, ...]:
    """What the count tokens count, in the order the processor writes them: each shape (plural), each colour,
    then every object ("circles", ..., "red", ..., "objects"). These are the labels the prompt shows."""
    return (*(f"{s}s" for s in synthetic.SHAPES), *synthetic.COLOURS, "objects")


def block_words() -> tuple[list[str], list[str]]:
    """The words a block's two tokens are fitted to: (colour words + " no", shape words + " object")."""
    return [f" {c}" for c in synthetic.COLOURS] + [" no"], [f" {s}" for s in synthetic.SHAPES] + [" object"]


def nearest(tokens: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """(B, N, D) tokens, (W, D) word embeddings -> (B, N) index of each token's nearest word (squared distance,
    broadcast rather than cdist: the same graph for any batch size when exported to ONNX)."""
    return ((tokens.float().unsqueeze(2) - words.float()) ** 2).sum(-1).argmin(-1)


class CountTokens(nn.Module):
    """Block tokens (B, blocks * 2, D) -> one token per count label (B, labels, D): each tally's digit embedding."""

    def __init__(self, labels: tuple[str, ...], hidden_size: int):
        super().__init__()
        known = count_labels()
        unknown = [label for label in labels if label not in known]
        if unknown:
            raise ValueError(f"count labels {unknown} are not among what the counter can count: {list(known)}")
        self.labels = tuple(labels)
        colours, shapes = block_words()
        # Word tables, filled by set_words from the decoder's embeddings (zeros until then: every tally is 0).
        self.register_buffer("colour_words", torch.zeros(len(colours), hidden_size))
        self.register_buffer("shape_words", torch.zeros(len(shapes), hidden_size))
        self.register_buffer("digit_words", torch.zeros(MAX_COUNT + 1, hidden_size))

    @torch.no_grad()
    def set_words(self, embed_tokens: nn.Embedding, token_id) -> None:
        """Copy the rows the counter needs from the decoder's embedding table. token_id(text) -> the id of a
        one-token word (the processor's tokenizer): " red", " circle", ..., and the digits "0".."9" as an
        answer starts (no leading space, as the assistant's reply begins)."""
        colours, shapes = block_words()
        for table, words in ((self.colour_words, colours), (self.shape_words, shapes),
                             (self.digit_words, [str(n) for n in range(MAX_COUNT + 1)])):
            ids = torch.tensor([token_id(w) for w in words], device=embed_tokens.weight.device)
            table.copy_(embed_tokens(ids).to(table.dtype))

    def tallies(self, block_tokens: torch.Tensor) -> torch.Tensor:
        """(B, blocks * 2, D) -> (B, labels) integer counts, from each block's nearest colour and shape word."""
        colour = nearest(block_tokens[:, 0::2], self.colour_words)
        shape = nearest(block_tokens[:, 1::2], self.shape_words)
        no_colour = len(synthetic.COLOURS)  # the " no" row: an empty block
        counts = []
        for label in self.labels:
            if label == "objects":
                counts.append((colour != no_colour).sum(1))
            elif label in synthetic.COLOURS:
                counts.append((colour == synthetic.COLOURS.index(label)).sum(1))
            else:
                counts.append((shape == synthetic.SHAPES.index(label[:-1])).sum(1))
        return torch.stack(counts, dim=1).clamp(max=MAX_COUNT)

    def forward(self, block_tokens: torch.Tensor) -> torch.Tensor:
        if block_tokens.shape[1] % 2:
            raise ValueError("count tokens read two tokens per block (colour, shape): use tokens_per_block=2")
        return self.digit_words[self.tallies(block_tokens)].to(block_tokens.dtype)
