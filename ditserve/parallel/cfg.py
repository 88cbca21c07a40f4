"""CFG parallelism: the conditional and unconditional branches of classifier-free guidance on two
ranks (or two halves of the replica), exchanged and combined every step.

Attaches from outside: `apply_cfg_parallel` wraps the pipeline's `sampling` stage so that the
`ClassifierFree` guidance it returns becomes `CfgParallelGuidance`; the families' model calls
already accept a lone ("uncond",) branch. A run without guidance runs the one conditional call on
both halves (no exchange).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from ditserve.parallel.attention import all_gather_cat
from ditserve.parallel.groups import Axis
from ditserve.sampling.guidance import ClassifierFree, ModelCall, cfg_combine, norm_rescale

log = logging.getLogger(__name__)

BRANCHES = ("cond", "uncond")


@dataclass(frozen=True)
class CfgParallelGuidance(ClassifierFree):
    """`ClassifierFree` with the branches split over `axis` (size 2): member i runs BRANCHES[i],
    then both predictions are gathered and combined exactly as the one-process guidance does."""

    axis: Axis | None = None

    def predict(self, call: ModelCall, x: torch.Tensor, expert: int = 0) -> torch.Tensor:
        mine = call(x, (BRANCHES[self.axis.rank],))
        cond, uncond = all_gather_cat(mine, self.axis, dim=0).chunk(2)
        scale = self.scale_2 if expert == 1 and self.scale_2 is not None else self.scale
        guided = cfg_combine(cond, uncond, scale)
        return norm_rescale(guided, cond) if self.rescale == "norm" else guided


def cfg_parallel(guidance, axis: Axis):
    """The guidance a CFG-parallel rank uses in place of `guidance`."""
    if not isinstance(guidance, ClassifierFree) or axis.size == 1:
        return guidance
    fields = {f.name: getattr(guidance, f.name) for f in dataclasses.fields(ClassifierFree)}
    return CfgParallelGuidance(**fields, axis=axis)


def apply_cfg_parallel(pipeline, axis: Axis):
    """Wrap `pipeline.sampling` (instance attribute) so its guidance runs CFG-parallel over `axis`."""
    if axis.size == 1:
        return pipeline
    if axis.size != 2:
        raise ValueError(f"CFG parallelism splits two branches, not {axis.size}")
    plain = pipeline.sampling

    def sampling(*args, **kwargs):
        s = plain(*args, **kwargs)
        return dataclasses.replace(s, guidance=cfg_parallel(s.guidance, axis))

    pipeline.sampling = sampling
    log.info("CFG parallel: this rank runs the %s branch", BRANCHES[axis.rank])
    return pipeline
