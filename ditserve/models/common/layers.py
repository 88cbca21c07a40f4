"""Small layers the families share."""

from __future__ import annotations

import torch
from torch import nn


def gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    """`F.gelu(x, approximate="tanh")` written over `x` (a view too): the same values, no second tensor."""
    return torch._C._nn.gelu_(x, approximate="tanh")


class GELUInPlace(nn.Module):
    """`nn.GELU(approximate="tanh")` written over its input: a feed-forward's hidden layer is its widest
    tensor (4x the model width a token), and the GELU's own output would be a second one beside it. For
    inputs nothing else reads, as the hidden layer of `Linear, GELU, Linear`. The same values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh_(x)


def feed_forward(dim: int, hidden: int) -> nn.Sequential:
    """Linear, tanh GELU (in place), Linear: as diffusers' `FeedForward(activation_fn="gelu-approximate")`,
    with its weights under the same indices (0 and 2)."""
    return nn.Sequential(nn.Linear(dim, hidden), GELUInPlace(), nn.Linear(hidden, dim))
