"""Step caching: skip transformer blocks on denoising steps whose inputs barely changed.

Neighbouring denoising steps feed a DiT nearly the same input, so the blocks' total update (the
residual they add to each stream) changes little; where a cheap probe says so, the cached residual is
added instead of running the blocks. Methods, each over a model's plan:

- `first-block` (FBCache): run the first block; when the relative L1 change of its residual against
  the last computed step is below the threshold, add the cached residual of the remaining blocks.
- `dual-block` (DBCache): the first `fn` blocks are the probe and the last `bn` always run; the middle
  is reused under the same test; warm-up steps and caps on cached steps (in total, in a row).
- `teacache`: accumulate the rescaled relative change of the timestep-modulated input (the family's
  published polynomial, `plan.teacache`) and reuse the residual of all blocks while the sum stays
  below the threshold; the first and last steps always compute.
- TaylorSeer (`taylorseer_order` 1-2) on any of them: extrapolate the cached residual from its
  divided differences over the last computed steps instead of reusing it unchanged.

State lives in the step context: `ctx.states[k]` per branch (cond and uncond apart, also when
batched), one value per sample for the change measures. Each sample decides for itself; a call runs the
blocks when any of its samples needs them, and then every sample's cache is refreshed. A sample opts
out through `ctx.cache_enabled` (one bool per sample of a chunk; absent or None: all take part): its
batch then always computes. A call without a context runs uncached. Across ranks,
the change measure is summed over the sequence-parallel group and the decision agreed over the sync
group (e.g. CFG-parallel ranks), so every rank takes the same branch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ditserve.accel.segments import SegmentedDiT
from ditserve.api import InvalidRequest
from ditserve.api.output import CACHE_STATS_KEY, CacheStats
from ditserve.config.engine import CacheConfig
from ditserve.models.common.dit import Hidden, StepContext

log = logging.getLogger(__name__)

STATE_KEY = "step_cache"  # this module's per-branch state in StepContext.states[k]

# Defaults where the config leaves a value unset; teacache's come from the family's published fit.
# 0.08 is FBCache's and DBCache's customary threshold; on the demo model it skips 44% of 20 steps and
# 69% of 50 at 47 and 43 dB against uncached (benchmarks/cache_quality.py). dual-block's fn None:
# DBCache's 8 probe blocks, at most a quarter of the model's blocks (FLUX.1: 8 of 57; the demo: 1 of 6).
METHOD_DEFAULTS = {
    "first-block": {"threshold": 0.08, "warmup_steps": 0, "fn": 1, "bn": 0},
    "dual-block": {"threshold": 0.08, "warmup_steps": 0, "fn": None, "bn": 0},
}

Segment = Callable[[Hidden], Hidden]


@dataclass(frozen=True)
class CachePolicy:
    """A CacheConfig resolved against one model: every value set. `fn` = 0 means the probe is the
    teacache signal (no block runs before the decision); `coefficients` only for teacache."""

    method: str
    threshold: float
    warmup_steps: int
    fn: int
    bn: int
    order: int
    max_cached: int | None
    max_consecutive: int | None
    coefficients: tuple[float, ...] = ()
    signal: Callable | None = None


def resolve_policy(cfg: CacheConfig, dit: nn.Module) -> CachePolicy:
    """Fill the method's defaults and check them against the model; InvalidRequest (one line) when
    the model cannot take the method."""
    blocks = len(dit.blocks)
    common = {"method": cfg.method, "order": cfg.taylorseer_order, "max_cached": cfg.max_cached_steps,
              "max_consecutive": cfg.max_consecutive_cached_steps}
    if cfg.method == "teacache":
        fit = dit.plan.teacache(dit.cfg) if dit.plan.teacache is not None else None
        if fit is None:
            raise InvalidRequest(f"teacache has no published coefficients for this {type(dit).__name__} checkpoint;"
                                 " use first-block or dual-block", "cache")
        return CachePolicy(threshold=_pick(cfg.threshold, fit.threshold),
                           warmup_steps=_pick(cfg.warmup_steps, fit.warmup_steps), fn=0, bn=0,
                           coefficients=tuple(fit.coefficients), signal=fit.signal, **common)
    d = METHOD_DEFAULTS[cfg.method]
    fn = _pick(cfg.fn, d["fn"] or max(1, min(8, blocks // 4)))
    bn = _pick(cfg.bn, d["bn"])
    if fn + bn >= blocks:
        raise InvalidRequest(f"{cfg.method} needs a middle to skip: fn {fn} + bn {bn} must be below the "
                             f"model's {blocks} blocks", "cache.fn")
    return CachePolicy(threshold=_pick(cfg.threshold, d["threshold"]),
                       warmup_steps=_pick(cfg.warmup_steps, d["warmup_steps"]), fn=fn, bn=bn, **common)


def _pick(value, default):
    return default if value is None else value


@dataclass
class BranchState:
    """One branch's cache over a run, one row per sample of its chunk.

    `ref`: the probe at the last computed call (teacache: at the previous call); `acc`: teacache's
    accumulated change; `ladders[j]`: stream j's cached residual followed by its divided differences
    over the computed steps `points` (newest first; TaylorSeer).
    """

    ref: torch.Tensor | None = None
    acc: torch.Tensor | None = None
    ladders: list[list[torch.Tensor]] = field(default_factory=list)
    points: list[int] = field(default_factory=list)
    cached_total: int = 0
    cached_in_row: int = 0

    def usable(self, rows: int) -> bool:
        return bool(self.ladders) and self.ref is not None and self.ref.shape[0] == rows

    def estimate(self, step: int) -> list[torch.Tensor]:
        """Each stream's residual at `step`: the polynomial through the last computed residuals in
        Newton's form (order 0: the last residual as it is)."""
        out = []
        for ladder in self.ladders:
            est, weight = ladder[0], 1.0
            for m in range(1, len(ladder)):
                weight *= step - self.points[m - 1]
                est = est + ladder[m] * weight
            out.append(est)
        return out

    def record(self, residuals: list[torch.Tensor], step: int, order: int) -> None:
        """Fresh residuals computed at `step`; with TaylorSeer, their divided differences against the
        previous computed calls' (one more order per computed call, up to `order`). Unlike Taylor
        terms from plain step differences, these make the extrapolation exact for residuals that are
        polynomials of degree `order` in the step, on any spacing of the computed steps."""
        if order == 0:
            self.ladders = [[r] for r in residuals]
        else:
            old = self.ladders or [[] for _ in residuals]
            ladders = []
            for r, prev in zip(residuals, old):
                ladder = [r.float()]  # differences of bf16 residuals would cancel to noise
                for m in range(min(order, len(prev))):
                    ladder.append((ladder[m] - prev[m]) / (step - self.points[m]))
                ladders.append(ladder)
            self.ladders = ladders
        self.points = [step, *self.points][:order + 1]
        self.cached_in_row = 0

class StepCache:
    """The skip policy of one cached DiT, as `SegmentedDiT.run_groups`: decides per call whether the
    cached segment runs and keeps its state in the step context. `totals` counts over the process
    lifetime (all runs), for benchmarks and metrics."""

    def __init__(self, policy: CachePolicy, dit: nn.Module, sp_group=None, sync_group=None):
        self.policy, self.dit = policy, dit
        self.sp_group, self.sync_group = sp_group, sync_group
        self.totals = CacheStats(policy.method)

    def __call__(self, h: Hidden, groups: list[Segment], ctx: StepContext | None) -> Hidden:
        enabled = None if ctx is None else getattr(ctx, "cache_enabled", None)
        if ctx is None or (enabled is not None and not any(enabled)):
            for run in groups:  # uncached: a plain forward, or every sample opted out
                h = run(h)
            return h
        p = self.policy
        branches = [s.setdefault(STATE_KEY, BranchState()) for s in ctx.states]
        stats = ctx.states[0].setdefault(CACHE_STATS_KEY, CacheStats(p.method))
        if p.fn:  # block probe: the first group's residual on the first stream
            h1 = groups[0](h)
            probe, middle, tail = h1.streams[0] - h.streams[0], groups[1], groups[2:]
        else:  # teacache: the timestep-modulated input, before any block
            h1, probe, middle, tail = h, p.signal(self.dit, h), groups[0], groups[1:]
        reuse = self._decide(probe, branches, ctx, enabled)
        if reuse:
            estimates = [b.estimate(ctx.step) for b in branches]
            streams = tuple(s + _cat([e[j] for e in estimates]).to(s.dtype) for j, s in enumerate(h1.streams))
            out = Hidden(streams, h1.consts)
            for b in branches:
                b.cached_total += 1
                b.cached_in_row += 1
        else:
            out = middle(h1)
            chunks = [(o - i).chunk(len(branches)) for o, i in zip(out.streams, h1.streams)]
            for k, b in enumerate(branches):
                b.record([c[k] for c in chunks], ctx.step, p.order)
        for run in tail:
            out = run(out)
        for counter in (stats, self.totals):
            counter.forwards += 1
            counter.skipped += int(reuse)
        return out

    def _forced(self, branches: list[BranchState], rows: int, ctx: StepContext) -> bool:
        """Whether this call must compute whatever the measure says (same on every rank)."""
        p = self.policy
        if p.threshold <= 0 or ctx.step < p.warmup_steps:  # 0 never skips, even where a fit dips below 0
            return True
        if p.method == "teacache" and ctx.step == ctx.num_steps - 1:
            return True
        for b in branches:
            if not b.usable(rows):
                return True
            if p.max_cached is not None and b.cached_total >= p.max_cached:
                return True
            if p.max_consecutive is not None and b.cached_in_row >= p.max_consecutive:
                return True
        return False

    def _decide(self, probe: torch.Tensor, branches: list[BranchState], ctx: StepContext, enabled) -> bool:
        """True to reuse the cache for the whole call; updates the measures' state either way."""
        p = self.policy
        rows = probe.shape[0] // len(branches)
        forced = self._forced(branches, rows, ctx)
        want, acc = None, None
        if not forced:
            rel = self._relative_change(probe, _cat([b.ref for b in branches]))
            if p.method == "teacache":
                acc = _cat([b.acc for b in branches]) + _polyval(p.coefficients, rel)
                want = acc < p.threshold
            else:
                want = rel < p.threshold
            if enabled is not None:
                want = want & torch.tensor(enabled, device=want.device).repeat(len(branches))
        reuse = self._agree(want is not None and bool(want.all()))
        if p.method == "teacache":  # the published recipe: the reference moves every call
            acc = torch.zeros(probe.shape[0], dtype=torch.float64, device=probe.device) if not reuse else acc
            for b, ref, a in zip(branches, probe.chunk(len(branches)), acc.chunk(len(branches))):
                b.ref, b.acc = ref.clone(), a  # the signal may be a graph's output buffer: keep a copy
        elif not reuse:  # block probes: compared against the last computed call
            for b, ref in zip(branches, probe.chunk(len(branches))):
                b.ref = ref
        return reuse

    def _relative_change(self, probe: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Per sample: sum |probe - ref| / sum |ref| (mean ratio), summed over the sequence shards."""
        diff = (probe - ref).abs().flatten(1).sum(1, dtype=torch.float32)
        base = ref.abs().flatten(1).sum(1, dtype=torch.float32)
        if self.sp_group is not None:
            both = torch.stack([diff, base])
            dist.all_reduce(both, group=self.sp_group)
            diff, base = both[0], both[1]
        return diff / base

    def _agree(self, reuse: bool) -> bool:
        """Reuse only where every rank of the sync group would (they then run the same segments)."""
        if self.sync_group is None:
            return reuse
        flag = torch.tensor([int(reuse)], device=_group_device(self.sync_group))
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.sync_group)
        return bool(flag.item())


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _polyval(coefficients: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    """Horner's rule, highest power first (numpy.poly1d's order), in float64."""
    x = x.double()
    out = torch.zeros_like(x)
    for c in coefficients:
        out = out * x + c
    return out


def _group_device(group) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def apply_cache(dit: nn.Module, cfg: CacheConfig, *, graphs: bool = False, sp_group=None,
                sync_group=None) -> nn.Module:
    """`dit` as a SegmentedDiT whose block groups a StepCache runs: [probe | middle | last bn] for the
    block methods, one group for teacache. `graphs` replays the segments as CUDA graphs (on CUDA).
    `sp_group` sums the change measure over sequence shards; `sync_group` agrees the decision
    (CFG-parallel ranks). A method of "none" returns `dit` unchanged."""
    if not cfg.enabled:
        return dit
    between = None
    if isinstance(dit, SegmentedDiT):  # already segmented (graphs, a parallel hook): keep both
        graphs, between, dit = graphs or dit.use_graphs, dit.between, dit.dit
    policy = resolve_policy(cfg, dit)
    blocks = len(dit.blocks)
    bounds = None
    if policy.fn:
        bounds = (policy.fn,) if policy.bn == 0 else (policy.fn, blocks - policy.bn)
    seg = SegmentedDiT(dit, graphs=graphs, bounds=bounds)
    seg.between = between
    seg.run_groups = StepCache(policy, dit, sp_group, sync_group)
    log.info("step cache %s: threshold %g, warm-up %d, fn %d, bn %d, taylorseer %d (%d blocks)", policy.method,
             policy.threshold, policy.warmup_steps, policy.fn, policy.bn, policy.order, blocks)
    return seg


def step_cache(dit: nn.Module) -> StepCache | None:
    """The StepCache of a DiT that `apply_cache` wrapped, else None."""
    hook = getattr(dit, "run_groups", None) if isinstance(dit, SegmentedDiT) else None
    return hook if isinstance(hook, StepCache) else None
