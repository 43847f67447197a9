"""Batches of similar length: less padding, so a CPU step computes fewer wasted tokens.

A batch pads every row to its longest one. The mini-cauldron mixes ~70-token multiple-choice prompts with ~40-token
short questions, so a random batch is about a third padding. Like Hugging Face's `group_by_length`, each pool of
`pool` batches' worth of shuffled rows is sorted by length before it is cut into batches, and the batches are then
shuffled: every row is still seen once per epoch, in an order fixed by the seed, and a batch holds rows of similar
length. The position (the RNG and the batches left in this epoch) is saved in checkpoints, so a resumed run reads
what the uninterrupted run would have read next.
"""

from __future__ import annotations

import random


class LengthGroupedRows:
    """A row source for the Trainer (`next_rows`, `state_dict`, `load_state_dict`) that groups rows by length."""

    def __init__(self, rows, lengths: list[int], batch_size: int, seed: int, pool: int = 8):
        if len(rows) != len(lengths):
            raise ValueError(f"{len(rows)} rows but {len(lengths)} lengths")
        if len(rows) < batch_size:
            raise ValueError(f"{len(rows)} training rows cannot fill one batch of {batch_size}")
        if pool < 1:
            raise ValueError(f"the length-grouping pool must be >= 1 batch, got {pool}")
        self.rows, self.lengths, self.batch_size, self.pool, self.seed = rows, lengths, batch_size, pool, seed
        self.rng = random.Random(seed)
        self.batches: list[list[int]] = []

    def new_epoch(self) -> None:
        order = list(range(len(self.rows)))
        self.rng.shuffle(order)
        size = self.batch_size * self.pool
        batches = []
        for start in range(0, len(order) - self.batch_size + 1, size):
            chunk = sorted(order[start:start + size], key=lambda i: self.lengths[i])
            batches += [chunk[k:k + self.batch_size]
                        for k in range(0, len(chunk) - self.batch_size + 1, self.batch_size)]
        self.rng.shuffle(batches)
        self.batches = batches

    def next_indices(self) -> list[int]:
        if not self.batches:
            self.new_epoch()
        return self.batches.pop()

    def next_rows(self, n: int) -> list:
        if n != self.batch_size:
            raise ValueError(f"length-grouped batches hold {self.batch_size} rows; {n} were asked for")
        return [self.rows[i] for i in self.next_indices()]

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"grouped": True, "num_rows": len(self.rows), "seed": self.seed, "batch_size": self.batch_size,
                "pool": self.pool, "rng": [version, list(internal), gauss], "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        mine = {"num_rows": len(self.rows), "seed": self.seed, "batch_size": self.batch_size, "pool": self.pool}
        saved = {key: state.get(key) for key in mine}
        if not state.get("grouped") or saved != mine:
            raise ValueError(f"the checkpoint's batches were {saved if state.get('grouped') else 'not length-grouped'}, "
                             f"this run's are {mine}: resume with the same data, batch size and group_by_length")
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.batches = [list(b) for b in state["batches"]]
