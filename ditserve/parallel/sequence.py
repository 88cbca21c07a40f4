"""Sequence parallelism: a DiT whose hidden state lives in sequence shards across the SP ranks.

`SequenceParallelDiT` keeps the DiT protocol: its `embed` runs the model's embed and keeps this
rank's shard of every stream and of the per-token tables (the model's plan says which: rotary rows,
key masks, per-token modulation); its `blocks` are the model's own, whose self-attention ops are
replaced by Ulysses, Ring or USP ops; its `head` gathers the shards and runs the model's head. So a
step cache or SegmentedDiT wraps it like any DiT, and the model code never changes.

A stream of n tokens over N ranks is padded to N * ceil(n / N) and cut into equal chunks; rank i
holds chunk i (i = ring * U + ulysses). Padded keys are masked in every attention; padded queries
are computed and dropped when the head gathers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from ditserve.api import InvalidRequest
from ditserve.models.common.dit import DiTWrapper, Hidden, StepContext, run_block
from ditserve.models.common.rope import Rotary
from ditserve.parallel.attention import RingAttention, SeqState, UlyssesAttention, all_gather_cat
from ditserve.parallel.groups import ParallelGroups

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """`n` tokens over `size` ranks: chunks of `chunk`, the last ones padded."""

    n: int
    size: int

    @property
    def chunk(self) -> int:
        return math.ceil(self.n / self.size)

    def valid(self, rank: int) -> int:
        """Real (unpadded) tokens in `rank`'s chunk."""
        return max(0, min(self.chunk, self.n - rank * self.chunk))

    def take(self, x: torch.Tensor, dim: int, rank: int, fill=0) -> torch.Tensor:
        """`rank`'s chunk of `x` along `dim` (padded with `fill` past the end)."""
        padded = self.chunk * self.size
        if x.shape[dim] != padded:
            shape = list(x.shape)
            shape[dim] = padded - x.shape[dim]
            x = torch.cat([x, x.new_full(shape, fill)], dim=dim)
        return x.narrow(dim, rank * self.chunk, self.chunk)


def take_joint(x, dim: int, splits: list[Split], rank: int, fill=0):
    """This rank's part of a table that runs over the joint sequence: each stream's segment cut on
    its own, the pieces joined again. Rotary tables are cut field by field; None stays None."""
    if x is None:
        return None
    if isinstance(x, Rotary):
        return Rotary(*(take_joint(t, dim, splits, rank, fill) for t in (x.cos, x.sin)))
    segments = x.split([s.n for s in splits], dim=dim)
    return torch.cat([s.take(seg, dim, rank, fill) for s, seg in zip(splits, segments)], dim=dim)


def shard_const(kind: str, value, splits: list[Split], stream_splits: list[Split], rank: int):
    """One const of `Hidden` as this rank needs it (see SequenceLayout.consts)."""
    if kind == "same":
        return value
    if kind == "rope":
        return take_joint(value, 0, splits, rank)
    if kind == "key_mask":
        return take_joint(value, 1, splits, rank, fill=False)
    if kind == "per_token":
        sharded = isinstance(value, torch.Tensor) and value.ndim in (2, 4)  # [B, L] or [B, L, n, D]
        return stream_splits[0].take(value, 1, rank) if sharded else value
    raise ValueError(f"unknown sequence-parallel const kind {kind!r}")


def build_attention_op(inner, groups: ParallelGroups, state: SeqState):
    """The op for a self-attention site: Ulysses, Ring, or USP (Ulysses around Ring)."""
    if groups.ring.size > 1:
        ring = RingAttention(groups.ring, state if groups.ulysses.size == 1 else SeqState())
        return ring if groups.ulysses.size == 1 else UlyssesAttention(groups.ulysses, ring, state)
    return UlyssesAttention(groups.ulysses, inner, state)


def _set_path(module: nn.Module, path: str, value) -> None:
    owner, _, attr = path.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, attr, value)


def _get_path(module: nn.Module, path: str):
    owner, _, attr = path.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr)


class SequenceParallelDiT(DiTWrapper):
    """`dit` with its hidden state sharded over `groups.sp` (see the module docstring)."""

    def __init__(self, dit: nn.Module, groups: ParallelGroups):
        super().__init__()
        layout = dit.plan.sequence
        if layout is None:
            raise InvalidRequest(f"{type(dit).__name__} has no sequence-parallel layout: --ulysses-degree and "
                             "--ring-degree are not supported for it", "ulysses_degree")
        self.dit, self.layout, self.axis = dit, layout, groups.sp
        self.state = SeqState()  # the joint sequence's padding
        # attention over some streams only: each stream set its own padding
        self.stream_states = {streams: SeqState() for _, streams in layout.stream_attention_sites}
        self._full: tuple | None = None  # (consts, lengths) of the forward in flight, for the head
        sites = [(site, self.state) for site in layout.self_attention_sites]
        sites += [(site, self.stream_states[streams]) for site, streams in layout.stream_attention_sites]
        ops = {}
        for block in dit.blocks:
            for site, state in sites:
                inner = _get_path(block, site)
                key = (id(inner), id(state))
                if key not in ops:  # one op per distinct inner op and padding (they are stateless)
                    ops[key] = build_attention_op(inner, groups, state)
                _set_path(block, site, ops[key])
        log.info("sequence parallel over %d ranks (ring %d x ulysses %d): %s", groups.sp.size, groups.ring.size,
                 groups.ulysses.size, ", ".join(sorted({op.__name__ for op in ops.values()})))

    def embed(self, inp) -> Hidden:
        """The model's embed, then this rank's shard of each stream and per-token const."""
        h = self.dit.embed(inp)
        rank, size = self.axis.rank, self.axis.size
        stream_splits = [Split(s.shape[1], size) for s in h.streams]
        joint = [stream_splits[i] for i in self.layout.joint_order]
        device = h.streams[0].device
        states = [(self.state, self.layout.joint_order), *((st, order) for order, st in self.stream_states.items())]
        for state, order in states:  # each attention's padded keys masked (decided from global shapes)
            splits = [stream_splits[i] for i in order]
            padded = any(s.n % size for s in splits)
            state.pad_mask = torch.cat([torch.arange(s.chunk, device=device) < s.valid(rank) for s in splits]) \
                if padded else None
        if len(self.layout.consts) != len(h.consts):
            raise ValueError(f"sequence layout names {len(self.layout.consts)} consts, the model has {len(h.consts)}")
        consts = tuple(shard_const(kind, c, joint, stream_splits, rank) for kind, c in zip(self.layout.consts, h.consts))
        self._full = (h.consts, [s.n for s in stream_splits])
        return Hidden(tuple(s.take(x, 1, rank) for s, x in zip(stream_splits, h.streams)), consts)

    def head(self, h: Hidden) -> torch.Tensor:
        """Gather the streams the head reads (dropping padding), then the model's head on the full
        hidden state with the unsharded consts."""
        consts, lengths = self._full
        streams = tuple(all_gather_cat(x, self.axis, dim=1)[:, :n] if i in self.layout.head_streams else None
                        for i, (x, n) in enumerate(zip(h.streams, lengths)))
        return self.dit.head(Hidden(streams, consts))

    @torch.no_grad()
    def forward(self, inp, ctx: StepContext | None = None) -> torch.Tensor:
        h = self.embed(inp)
        for block in self.blocks:
            h = run_block(block, h)
        return self.head(h)


def apply_sequence_parallel(dit: nn.Module, groups: ParallelGroups) -> nn.Module:
    """`dit` sharded over the SP ranks (unchanged at SP degree 1). Segment CUDA graphs are dropped:
    the sharded forward runs eagerly (its per-forward state lives in Python)."""
    if groups.sp.size == 1:
        return dit
    from ditserve.accel.segments import SegmentedDiT

    if isinstance(dit, SegmentedDiT):
        log.warning("sequence parallelism runs without segment CUDA graphs")
        dit = dit.dit
    heads = getattr(dit.cfg, "num_attention_heads", None)
    if heads is not None and groups.ulysses.size > 1 and (heads // groups.tp.size) % groups.ulysses.size:
        raise InvalidRequest(f"--ulysses-degree {groups.ulysses.size} needs the model's {heads} attention heads / "
                             f"--tp-size {groups.tp.size} divisible by it", "ulysses_degree")
    return SequenceParallelDiT(dit, groups)
