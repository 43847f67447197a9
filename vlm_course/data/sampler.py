"""The order training reads its rows in: a fresh shuffle each epoch, fixed by (seed, epoch), resumable.

The position (epoch, rows taken) is part of every checkpoint, so a resumed run reads the rows the
uninterrupted run would have read next. Under torchrun each process shards this one order
(`vlm_course.distributed.ShardedRows`).
"""

from __future__ import annotations

import torch


class SeededSampler:
    """Rows in a fresh random order each epoch, fixed by (seed, epoch); its position can be saved and restored."""

    def __init__(self, num_rows: int, seed: int):
        if num_rows < 1:
            raise ValueError("no training rows: check the data path and subsets")
        self.num_rows, self.seed = num_rows, seed
        self.epoch, self.position = 0, 0

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_rows, generator=generator).tolist()

    def take(self, n: int) -> list[int]:
        indices = []
        while len(indices) < n:
            if self.position == self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
            order = self.order(self.epoch)
            chunk = order[self.position:self.position + n - len(indices)]
            indices += chunk
            self.position += len(chunk)
        return indices

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_rows": self.num_rows, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if (state["num_rows"], state["seed"]) != (self.num_rows, self.seed):
            raise ValueError(f"the checkpoint was trained on {state['num_rows']} rows with seed {state['seed']}, "
                             f"this run has {self.num_rows} rows and seed {self.seed}: resume with the same data")
        self.epoch, self.position = state["epoch"], state["position"]
