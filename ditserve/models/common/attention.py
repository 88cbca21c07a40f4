"""The attention op every attention layer calls: q, k, v as [B, S, H, D] -> [B, S, H, D].

The op is chosen at load time and set on each layer's `attn_op` attribute; sequence parallelism
and faster kernels replace it from outside without touching model code.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionOp(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch SDPA with no backend forced: on Hopper it picks cuDNN, on CPU the math/flash path."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
