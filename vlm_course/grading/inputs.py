"""Seeded inputs and adaptors shared by the exercise definitions.

Honest checks need inputs on which wrong code gives wrong answers: random (not zero or one) LayerNorm
weights so that using the wrong norm shows, biases that are not zero so that a forgotten bias shows, more
than one head so that head-splitting mistakes show, non-square images so that row/column mix-ups show.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .core import GradingError


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def randomised(module: nn.Module, seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Give every parameter a seeded random value of a sensible scale, then cast.

    Weights (2-D and up) get std 1/sqrt(fan_in), so activations stay O(1) through a block; 1-D parameters
    (biases, LayerNorm weights) get 1 + 0.3 N(0,1) if named *weight*, else 0.3 N(0,1).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.dim() >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            else:
                p.copy_(0.3 * noise)
    return module.to(dtype).eval()


def load_weights(module: nn.Module, state: dict, name: str, reference_name: str) -> nn.Module:
    """Load the reference's weights into the learner's module by name, or say exactly what does not match."""
    if not isinstance(module, nn.Module):
        raise GradingError(f"{name}(...) should build an nn.Module, got {type(module).__name__}")
    own = module.state_dict()
    missing = [k for k in state if k not in own]
    unexpected = [k for k in own if k not in state]
    wrong = [f"{k} is {tuple(own[k].shape)}, expected {tuple(state[k].shape)}"
             for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        problems = ([f"missing {missing}"] if missing else []) + ([f"unexpected {unexpected}"] if unexpected else [])
        raise GradingError(f"{name}'s parameters do not match {reference_name}'s ({'; '.join(problems + wrong)}): "
                           "use the same submodule names and shapes, so that checkpoints load by name")
    module.load_state_dict(state)
    return module
