"""Run a DiT as segments — embed, groups of blocks, head — each replayed from a CUDA graph.

One graph for the whole forward leaves no place to branch: a step cache must skip the middle blocks
and a sequence-parallel wrapper must communicate between blocks. Graphs per segment keep launch gaps
out of each segment (the blocks, where the time goes, stay one graph per group) while the Python
between segments may decide what runs next (`between`). Off CUDA, or with `graphs=False`, the
segments run eagerly; the result is the model's plain forward either way. A step cache
(accel/cache.py) takes over the walk over the block groups (`run_groups`) to skip some of them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
from torch import nn

from ditserve.models.common.dit import DiTWrapper, Hidden, StepContext, run_block

log = logging.getLogger(__name__)


def flatten(obj) -> tuple[list[torch.Tensor], object]:
    """Tensors of a nested value (dataclasses, tuples, lists, None, scalars) and a spec that
    `unflatten` rebuilds it from; the spec holds shapes and dtypes, so it also keys a graph."""
    if isinstance(obj, torch.Tensor):
        return [obj], ("T", tuple(obj.shape), obj.dtype, obj.device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        tensors, specs = [], []
        for f in dataclasses.fields(obj):
            t, s = flatten(getattr(obj, f.name))
            tensors += t
            specs.append((f.name, s))
        return tensors, ("D", type(obj), tuple(specs))
    if isinstance(obj, (tuple, list)):
        tensors, specs = [], []
        for item in obj:
            t, s = flatten(item)
            tensors += t
            specs.append(s)
        return tensors, ("S", type(obj), tuple(specs))
    return [], ("V", obj)


def unflatten(spec, tensors: list[torch.Tensor]):
    it = iter(tensors)

    def build(s):
        kind = s[0]
        if kind == "T":
            return next(it)
        if kind == "D":
            return s[1](**{name: build(sub) for name, sub in s[2]})
        if kind == "S":
            return s[1](build(sub) for sub in s[2])
        return s[1]

    return build(spec)


class SegmentGraph:
    """One segment function replayed from a CUDA graph per input spec (shapes, dtypes, scalars)."""

    def __init__(self, name: str, fn: Callable, owner: "SegmentedDiT", warmup: int = 2):
        self.name, self.fn, self.owner, self.warmup = name, fn, owner, warmup
        self.graphs: dict = {}

    def __call__(self, arg):
        tensors, spec = flatten(arg)
        entry = self.graphs.get(spec)
        if entry is None:
            entry = self.graphs[spec] = self._capture(spec, tensors)
        graph, static_in, static_out = entry
        for dst, src in zip(static_in, tensors):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        graph.replay()
        return static_out

    def _capture(self, spec, tensors):
        static_in = [t.clone() for t in tensors]
        arg = unflatten(spec, static_in)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.fn(arg)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.owner.pool):
            static_out = self.fn(arg)
        self.owner.pool = graph.pool()
        log.info("captured segment %s for %d input tensors", self.name, len(static_in))
        return graph, static_in, static_out


class SegmentedDiT(DiTWrapper):
    """`dit` run segment by segment: embed, blocks in groups, head. Groups are `group_size` blocks
    each (all in one group by default) or, with `bounds`, split before each listed block index
    (e.g. (1, n - 1): first block, middle, last block).

    `between(h, k, ctx)` may rewrite the hidden state after block group k (None: nothing).
    `run_groups(h, groups, ctx)` may replace the plain walk over the groups (a step cache skips some):
    `groups[k]` runs group k's segment and then `between`; None runs them all in order.
    The final output is cloned, so callers may keep it across steps."""

    def __init__(self, dit: nn.Module, graphs: bool = True, group_size: int | None = None,
                 bounds: Sequence[int] | None = None):
        super().__init__()
        self.dit = dit
        self.pool = None
        blocks = dit.blocks
        if bounds is not None:
            edges = [0, *bounds, len(blocks)]
            if group_size is not None or any(a >= b for a, b in pairwise(edges)):
                raise ValueError(f"group bounds {tuple(bounds)} must rise strictly inside 1..{len(blocks) - 1}"
                                 " (and exclude group_size)")
            self.groups = [blocks[a:b] for a, b in pairwise(edges)]
        else:
            size = group_size or len(blocks)
            self.groups = [blocks[i:i + size] for i in range(0, len(blocks), size)]
        self.use_graphs = graphs
        self.between: Callable[[Hidden, int, StepContext | None], Hidden] | None = None
        self.run_groups: Callable[[Hidden, list[Callable[[Hidden], Hidden]], StepContext | None], Hidden] | None = None
        wrap = (lambda name, fn: SegmentGraph(name, fn, self)) if graphs else (lambda name, fn: fn)
        self.embed_fn = wrap("embed", dit.embed)
        self.group_fns = [wrap(f"blocks[{k}]", self._group_fn(group)) for k, group in enumerate(self.groups)]
        self.head_fn = wrap("head", dit.head)

    @staticmethod
    def _group_fn(group: list[nn.Module]) -> Callable[[Hidden], Hidden]:
        def run(h: Hidden) -> Hidden:
            for block in group:
                h = run_block(block, h)
            return h
        return run

    def _segment(self, k: int, graphs: bool, ctx: StepContext | None) -> Callable[[Hidden], Hidden]:
        run = self.group_fns[k] if graphs else self._group_fn(self.groups[k])
        if self.between is None:
            return run
        return lambda h: self.between(run(h), k, ctx)

    @torch.no_grad()
    def forward(self, inp, ctx: StepContext | None = None) -> torch.Tensor:
        graphs = self.use_graphs and flatten(inp)[0][0].is_cuda
        h = (self.embed_fn if graphs else self.dit.embed)(inp)
        segments = [self._segment(k, graphs, ctx) for k in range(len(self.groups))]
        if self.run_groups is not None:
            h = self.run_groups(h, segments, ctx)
        else:
            for segment in segments:
                h = segment(h)
        out = (self.head_fn if graphs else self.dit.head)(h)
        return out.clone() if graphs else out
