"""Small layers the families share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


# Per-token float32 pieces of a block (Wan's), as op slots: accel/token_kernels.py sets one-pass Triton
# kernels computing the same in their place when the DiT runs eager on CUDA.


def norm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm (no affine) over the last dim in float32, then ·(1 + scale) + shift (float32, broadcast
    over the tokens or per token), back in x's dtype."""
    return (F.layer_norm(x.float(), x.shape[-1:], None, None, eps) * (1 + scale) + shift).type_as(x)


def norm_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm with its affine weight and bias, in float32, back in x's dtype."""
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).type_as(x)


def gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y·gate in float32 (the gate is float32), with one float32 temporary, back in x's dtype."""
    return (y * gate).add_(x).type_as(x)
