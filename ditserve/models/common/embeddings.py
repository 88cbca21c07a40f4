"""Timestep and vector embedders shared by the DiTs."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0,
                       scale: float = 1.0) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of (fractional) timesteps [N], cosines first.

    As diffusers' `Timesteps`: the frequencies are rounded to t's dtype (visible in bf16) and the
    angles are `(t * freq) * scale`.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs.to(t.dtype)[None]
    if scale != 1.0:
        args = args * scale
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(nn.functional.silu(self.in_layer(x)))
