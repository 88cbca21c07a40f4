"""The DiT protocol every family implements, and what the denoising loop hands a model call.

A DiT splits its forward into `embed(inputs) -> Hidden`, the explicit list `blocks` (each maps
`(*hidden.streams, *hidden.consts)` to the new streams) and `head(hidden) -> prediction`. Caching,
offload, sequence sharding, compilation and CUDA graphs wrap these pieces from outside, reading the
model's `plan` (models/common/plan.py); model code never sees them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ditserve.models.common.plan import DiTPlan


@dataclass
class Hidden:
    """What flows through the blocks. `streams` are rewritten by every block (FLUX: img, txt;
    Wan: x); `consts` are the same for every block (conditioning vector, rotary tables, masks)."""

    streams: tuple[torch.Tensor, ...]
    consts: tuple = ()


@dataclass
class StepContext:
    """One model call inside a denoising run, and where wrappers keep state across its steps.

    The batch of the call is `len(branches)` equal chunks in order (e.g. ("cond", "uncond") when
    classifier-free guidance runs both as one batch). `states[k]` belongs to branch k of this run and
    expert: a step cache or a parallel wrapper keeps its per-branch state there. A run (one batch of
    requests through the loop) owns its contexts, so concurrent runs never share state.
    """

    step: int
    num_steps: int
    expert: int = 0
    branches: tuple[str, ...] = ("cond",)
    states: tuple[dict, ...] = field(default_factory=lambda: ({},))
    # per sample of a chunk: whether a step cache may reuse work for it (None: every sample may)
    cache_enabled: tuple[bool, ...] | None = None


def run_block(block: nn.Module, h: Hidden) -> Hidden:
    """One block over `h`; a block returns its one stream or a tuple of streams."""
    out = block(*h.streams, *h.consts)
    return Hidden(out if isinstance(out, tuple) else (out,), h.consts)


class DiT(nn.Module):
    """Base of our DiTs: subclasses set `plan`, build their modules and implement `embed`, `head`
    and `blocks`; the plain forward is embed -> every block -> head."""

    plan: ClassVar[DiTPlan]

    @property
    def blocks(self) -> list[nn.Module]:
        return [block for name in self.plan.block_lists for block in getattr(self, name)]

    def embed(self, inp) -> Hidden:
        raise NotImplementedError

    def head(self, h: Hidden) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, inp, ctx: StepContext | None = None) -> torch.Tensor:
        """`ctx` is for wrappers (caches, parallel); the plain model ignores it."""
        h = self.embed(inp)
        for block in self.blocks:
            h = run_block(block, h)
        return self.head(h)


class DiTWrapper(nn.Module):
    """Base of the wrappers that accel/ and parallel/ put around a DiT (segment graphs, sequence
    sharding): the wrapped model is `self.dit`, and its config, plan, blocks and other attributes
    read through."""

    @property
    def cfg(self):
        return self.dit.cfg

    @property
    def plan(self):
        return self.dit.plan

    @property
    def blocks(self) -> list[nn.Module]:
        return self.dit.blocks

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.dit, name)
