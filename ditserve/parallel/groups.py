"""Process groups of one replica: the rank mesh (cfg, ring, ulysses, tp) and a gloo control group.

Ranks are laid out with tensor parallelism innermost (most traffic, every layer), then Ulysses
(all-to-all per attention), then Ring (point-to-point, overlappable), then the CFG branch (one
exchange per step): rank = ((c * R + r) * U + u) * T + t. On one 8-GPU node this keeps the chatty
groups on neighbouring devices.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ditserve.config import ParallelConfig

log = logging.getLogger(__name__)

AXES = ("cfg", "ring", "ulysses", "tp")
# The control group carries requests and per-step decisions; an idle server waits on it for as long as
# no request comes, so it must not time out (a dead peer still fails it at once: its socket closes).
CONTROL_TIMEOUT = timedelta(days=365)


def mesh_shape(cfg: ParallelConfig) -> tuple[int, int, int, int]:
    """Degrees along AXES for one replica."""
    return cfg.cfg_degree, cfg.ring_degree, cfg.ulysses_degree, cfg.tp_size


def coords(rank: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Mesh coordinates of `rank` (last axis fastest)."""
    out = []
    for size in reversed(shape):
        out.append(rank % size)
        rank //= size
    return tuple(reversed(out))


def rank_of(coord: tuple[int, ...], shape: tuple[int, ...]) -> int:
    rank = 0
    for c, size in zip(coord, shape):
        rank = rank * size + c
    return rank


def axis_groups(shape: tuple[int, ...], axes: tuple[int, ...]) -> list[list[int]]:
    """Every group of ranks that differ only along `axes`, in a fixed order (all ranks must create
    groups in the same order)."""
    others = [i for i in range(len(shape)) if i not in axes]
    groups = []
    for fixed in itertools.product(*(range(shape[i]) for i in others)):
        members = []
        for varying in itertools.product(*(range(shape[i]) for i in axes)):
            coord = [0] * len(shape)
            for i, c in zip(others, fixed):
                coord[i] = c
            for i, c in zip(axes, varying):
                coord[i] = c
            members.append(rank_of(tuple(coord), shape))
        groups.append(sorted(members))
    return groups


@dataclass
class Axis:
    """One rank's view of a mesh axis (or of several axes taken together): its group, its index in
    the group and the group's size. Size 1: no group, nothing to communicate."""

    group: object | None
    rank: int
    size: int
    ranks: tuple[int, ...] = ()

    def global_rank(self, index: int) -> int:
        """The world rank of member `index` (point-to-point ops name world ranks)."""
        return self.ranks[index]


@dataclass
class ParallelGroups:
    """One rank's groups. `sp` is Ring x Ulysses (the ranks sharing one sequence; chunk index
    ring * U + ulysses); `control` a gloo group over the whole replica for requests and decisions."""

    rank: int
    world: int
    cfg: Axis
    ring: Axis
    ulysses: Axis
    tp: Axis
    sp: Axis
    control: object
    device: torch.device

    @property
    def is_driver(self) -> bool:
        """Rank 0 talks to the engine and decides; the others follow."""
        return self.rank == 0


def _axis(shape, axes, rank, backend) -> Axis:
    mine = None
    for members in axis_groups(shape, axes):
        group = dist.new_group(members, backend=backend) if len(members) > 1 else None
        if rank in members:
            mine = Axis(group, members.index(rank), len(members), tuple(members))
    return mine


def control_group():
    """A gloo group over every rank, for requests and per-step decisions (also under NCCL)."""
    return dist.new_group(list(range(dist.get_world_size())), backend="gloo", timeout=CONTROL_TIMEOUT)


def init_groups(cfg: ParallelConfig, device: torch.device, control=None) -> ParallelGroups:
    """Create this rank's groups (and the control group unless given); torch.distributed must be
    initialised with world size `cfg.group_size`. Collective: every rank calls it, in the same order."""
    world, rank = dist.get_world_size(), dist.get_rank()
    shape = mesh_shape(cfg)
    if world != cfg.group_size:
        raise ValueError(f"world size {world} != cfg {shape[0]} x ring {shape[1]} x ulysses {shape[2]} x tp {shape[3]}")
    backend = dist.get_backend()
    axes = {name: _axis(shape, (i,), rank, backend) for i, name in enumerate(AXES)}
    sp = _axis(shape, (1, 2), rank, backend)
    control = control if control is not None else control_group()
    groups = ParallelGroups(rank, world, axes["cfg"], axes["ring"], axes["ulysses"], axes["tp"], sp, control,
                            device)
    log.info("rank %d/%d: cfg %d/%d ring %d/%d ulysses %d/%d tp %d/%d on %s", rank, world, groups.cfg.rank,
             groups.cfg.size, groups.ring.rank, groups.ring.size, groups.ulysses.rank, groups.ulysses.size,
             groups.tp.rank, groups.tp.size, device)
    return groups
