"""Guidance: how the model calls of one step become one prediction.

    pred = guidance.predict(call, x, expert)

`call(x_in, branches)` runs the model on `x_in`, whose batch is `len(branches)` equal chunks
(branch names "cond", "uncond"), and returns the predictions in the same layout. Embedded guidance
(FLUX-dev) is a model input, not a combination: it runs as `NoGuidance`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

ModelCall = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """uncond + scale * (cond - uncond); `scale` may be per sample [N], broadcast over the rest."""
    if isinstance(scale, torch.Tensor):
        scale = scale.view(-1, *([1] * (cond.ndim - 1))).to(device=cond.device, dtype=cond.dtype)
    return uncond + scale * (cond - uncond)


def norm_rescale(guided: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Rescale each token's guided prediction to the norm of its conditional one (Qwen-Image's
    true CFG, as diffusers applies it): norms over the last dim."""
    return guided * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))


@dataclass(frozen=True)
class NoGuidance:
    """One conditional call per step."""

    def predict(self, call: ModelCall, x: torch.Tensor, expert: int = 0) -> torch.Tensor:
        return call(x, ("cond",))


@dataclass(frozen=True)
class ClassifierFree:
    """Classifier-free guidance with per-sample scales [N].

    - `scale_2`: the scales while the second expert runs (Wan 2.2's `guidance_scale_2`); None: `scale`.
    - `rescale`: "none", or "norm" for Qwen-Image's norm-preserving true CFG.
    - `batched`: cond and uncond as one batch of 2N (one call), else two calls of N.
    """

    scale: torch.Tensor
    scale_2: torch.Tensor | None = None
    rescale: str = "none"
    batched: bool = True

    def __post_init__(self):
        if self.rescale not in ("none", "norm"):
            raise ValueError(f"unknown CFG rescale {self.rescale!r}")

    def predict(self, call: ModelCall, x: torch.Tensor, expert: int = 0) -> torch.Tensor:
        if self.batched:
            cond, uncond = call(torch.cat([x, x]), ("cond", "uncond")).chunk(2)
        else:
            cond, uncond = call(x, ("cond",)), call(x, ("uncond",))
        scale = self.scale_2 if expert == 1 and self.scale_2 is not None else self.scale
        guided = cfg_combine(cond, uncond, scale)
        return norm_rescale(guided, cond) if self.rescale == "norm" else guided
