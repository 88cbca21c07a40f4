"""The attention op every attention layer calls: q, k, v as [B, S, H, D] -> [B, S, H, D].

The op is chosen at load time and set on each layer's `attn_op` attribute; sequence parallelism
and faster kernels replace it from outside without touching model code.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionOp(Protocol):
    """`mask` (optional keyword) is a key mask [B, S_k], True = attend; callers pass it only when
    some keys are padding, so an op without mask support still serves every unpadded batch."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """torch SDPA with no backend forced: on Hopper it picks cuDNN, on CPU the math/flash path."""
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=attn_mask)
    return out.transpose(1, 2)
