"""Classifier-free guidance arithmetic."""

from __future__ import annotations

import torch


def true_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """uncond + scale * (cond - uncond); `scale` may be per sample, broadcast over the rest."""
    if isinstance(scale, torch.Tensor):
        scale = scale.view(-1, *([1] * (cond.ndim - 1))).to(cond.dtype)
    return uncond + scale * (cond - uncond)


def norm_preserving_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """True CFG rescaled so each token's prediction keeps the norm of its conditional prediction
    (Qwen-Image's guidance, as diffusers applies it): norms over the last dim."""
    combined = true_cfg(cond, uncond, scale)
    cond_norm = torch.norm(cond, dim=-1, keepdim=True)
    combined_norm = torch.norm(combined, dim=-1, keepdim=True)
    return combined * (cond_norm / combined_norm)
