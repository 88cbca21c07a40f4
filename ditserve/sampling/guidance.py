"""Classifier-free guidance arithmetic."""

from __future__ import annotations

import torch


def true_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """uncond + scale * (cond - uncond); `scale` may be per sample, broadcast over the rest."""
    if isinstance(scale, torch.Tensor):
        scale = scale.view(-1, *([1] * (cond.ndim - 1))).to(cond.dtype)
    return uncond + scale * (cond - uncond)
