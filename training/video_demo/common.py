"""What the video demo's two stages share beyond the image demo's helpers: bfloat16 autocast on CUDA,
a learning-rate curve that also follows the clock when a stage has a deadline, per-step randomness
drawn on the training device, and whole training steps captured as CUDA graphs.

Why graphs: both models are tiny, so on a GPU a step is bound by kernel launches, not arithmetic
(profiled on a CPU: a VAE step on 5-frame clips is ~17k ATen calls, on 9-frame clips ~23k, a DiT +
UMT5 step ~8.6k plus the optimiser; the H200 ran them at 3-4 and 9.5 steps/s whatever the batch).
Replaying the captured step (forward, backward, clipping, AdamW) costs one launch; what changes per
step (the batch, the noise, the learning rate) is copied into the graph's static tensors first.
Anything that cannot be captured falls back to the same step run eagerly.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import torch

from training.demo.common import lr_at, step_rng

from . import config

log = logging.getLogger(__name__)


def autocast(recipe: config.Recipe, device: torch.device, graphed: bool = False):
    """bfloat16 autocast on CUDA when the recipe asks for it (without its weight cache when the step
    is captured as a CUDA graph, as graphs require); nothing otherwise."""
    if recipe.autocast and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graphed)
    return contextlib.nullcontext()


def lr_now(step: int, base: float, warmup: int, total: int, started: float, deadline: float | None) -> float:
    """``lr_at`` (warm-up, then cosine to ``total``); with a deadline, the cosine runs at least as far
    as the fraction of the time since ``started`` (``time.monotonic()``), so it ends at the deadline
    when the stage cannot take all its steps."""
    if deadline is None or step < warmup:
        return lr_at(step, base, warmup, total)
    timed = int(total * (time.monotonic() - started) / max(1e-6, deadline - started))
    return lr_at(min(total, max(step, timed)), base, warmup, total)


def device_generator(seed: int, stage: int, step: int, device: torch.device) -> torch.Generator:
    """torch randomness for one step of one stage, on ``device`` (so a GPU step copies nothing from
    the host); on the CPU the same stream as ``training.demo.common.step_generator``."""
    return torch.Generator(device).manual_seed(int(step_rng(seed, stage, step).integers(2**62)))


def make_adamw(params, lr: float, device: torch.device, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW; on CUDA capturable (state and learning rate on the device, as CUDA graphs need)."""
    if device.type == "cuda":
        return torch.optim.AdamW(params, lr=torch.tensor(lr, device=device), weight_decay=weight_decay,
                                 capturable=True, foreach=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def set_lr(opt: torch.optim.Optimizer, value: float) -> None:
    """Set every group's learning rate in place (a device tensor stays the same tensor: graph-safe)."""
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def lr_tensors_on(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """After ``load_state_dict`` (which restores the saved groups' settings, a checkpoint's lr tensor
    included, on the CPU): on CUDA make the optimiser capturable again with its lr a device tensor."""
    if device.type != "cuda":
        for group in opt.param_groups:
            group["capturable"] = False
            if isinstance(group["lr"], torch.Tensor):
                group["lr"] = float(group["lr"].item())
        return
    for group in opt.param_groups:
        group["capturable"], group["foreach"] = True, True
        group["lr"] = torch.tensor(float(group["lr"]), device=device)


def lr_value(opt: torch.optim.Optimizer) -> float:
    lr = opt.param_groups[0]["lr"]
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)


def _snapshot(modules: list[torch.nn.Module], opt: torch.optim.Optimizer) -> tuple[list, dict]:
    params = [p.detach().clone() for m in modules for p in m.parameters()]
    state = {id(p): {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)} for p, s in opt.state.items()}
    return params, state


def _restore(modules: list[torch.nn.Module], opt: torch.optim.Optimizer, snap: tuple[list, dict]) -> None:
    """Undo the warm-up steps in place (the graph holds these very tensors)."""
    params, state = snap
    with torch.no_grad():
        for p, saved in zip((p for m in modules for p in m.parameters()), params):
            p.copy_(saved)
        for p, s in opt.state.items():
            saved = state.get(id(p))
            for k, v in s.items():
                if isinstance(v, torch.Tensor):
                    v.copy_(saved[k]) if saved is not None else v.zero_()


def capture_step(step: Callable[[], object], modules: list[torch.nn.Module], opt: torch.optim.Optimizer,
                 name: str, warmup: int = 3) -> torch.cuda.CUDAGraph | None:
    """Capture ``step`` (forward, backward, clipping and ``opt.step()`` on static tensors, returning
    nothing the host needs) as a CUDA graph, or None when it cannot be: the warm-up runs with CUDA's
    sync debug mode set to "error", so a step that waits on the GPU (``.item()``, a data-dependent
    branch, a pageable copy) is found before capture. The warm-up steps' updates are undone. Replay
    with ``graph.replay()`` after filling the static inputs; gradients are not zeroed between
    replays (each replay's backward writes them afresh)."""
    snap = _snapshot(modules, opt)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(warmup):
                opt.zero_grad(set_to_none=True)
                if i == warmup - 1:
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            step()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - anything: the eager step is the fallback
        torch.cuda.set_sync_debug_mode("default")
        log.warning("%s: CUDA graph capture failed (%s: %s); running the step eagerly", name, type(exc).__name__,
                    str(exc).splitlines()[0][:200] if str(exc) else "")
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
        graph = None
    _restore(modules, opt, snap)
    opt.zero_grad(set_to_none=graph is None)
    if graph is not None:
        log.info("%s: training step captured as a CUDA graph", name)
    return graph
