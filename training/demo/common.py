"""What both training stages share: per-step randomness, the learning-rate curve, checkpoints, the EMA.

Every step draws its batch from generators seeded with (seed, stage, step) alone, so a run that
stops and resumes from a checkpoint takes exactly the batches an unbroken run would.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

STAGE_VAE, STAGE_DIT, STAGE_DATA = 1, 2, 3


def step_rng(seed: int, stage: int, step: int) -> np.random.Generator:
    """numpy randomness for one step of one stage."""
    return np.random.default_rng([seed, stage, step])


def step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    """torch (CPU) randomness for one step of one stage."""
    return torch.Generator("cpu").manual_seed(int(step_rng(seed, stage, step).integers(2**62)))


def lr_at(step: int, base: float, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``floor * base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    log.info("checkpoint %s (step %d)", path, state["step"])


def load_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    log.info("resuming from %s (step %d)", path, state["step"])
    return state


def checkpoint_step(path: Path, parts: dict, step: int, end: int, every: int, deadline: float | None) -> bool:
    """After ``step`` of a stage: save the state dicts of ``parts`` (modules, optimiser) with the step
    every ``every`` steps, at ``end`` and once past ``deadline`` (``time.monotonic()``). True when past
    it: the caller stops, and the same command resumes from the checkpoint."""
    out_of_time = deadline is not None and time.monotonic() > deadline
    if (step + 1) % every == 0 or step + 1 == end or out_of_time:
        save_checkpoint(path, {**{k: v.state_dict() for k, v in parts.items()}, "step": step + 1})
    return out_of_time


@torch.no_grad()
def ema_update(ema_params: list[torch.Tensor], params: list[torch.Tensor], step: int, decay: float) -> None:
    """Move the EMA weights towards the model's, with the decay warming up over the first steps."""
    torch._foreach_lerp_(ema_params, params, 1 - min(decay, (1 + step) / (10 + step)))


def images_to_tensor(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1], as diffusers' VAEs expect."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
