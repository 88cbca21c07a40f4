"""What the video demo's two stages share beyond the image demo's helpers: bfloat16 autocast on CUDA,
and a learning-rate curve that also follows the clock when a stage has a deadline."""

from __future__ import annotations

import contextlib
import time

import torch

from training.demo.common import lr_at

from . import config


def autocast(recipe: config.Recipe, device: torch.device):
    """bfloat16 autocast on CUDA when the recipe asks for it; nothing otherwise."""
    if recipe.autocast and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_now(step: int, base: float, warmup: int, total: int, started: float, deadline: float | None) -> float:
    """``lr_at`` (warm-up, then cosine to ``total``); with a deadline, the cosine runs at least as far
    as the fraction of the time since ``started`` (``time.monotonic()``), so it ends at the deadline
    when the stage cannot take all its steps."""
    if deadline is None or step < warmup:
        return lr_at(step, base, warmup, total)
    timed = int(total * (time.monotonic() - started) / max(1e-6, deadline - started))
    return lr_at(min(total, max(step, timed)), base, warmup, total)
