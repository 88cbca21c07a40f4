"""Tensor parallelism for a DiT, from its plan's `TensorLayout`, applied while it loads.

Megatron's pairing inside every block: the linears that make heads (q/k/v, the MLP's first layer)
are split by output features (column-parallel: each rank computes its own heads, no communication);
the linears that consume them (the attention output, the MLP's second layer) are split by input
features (row-parallel: each rank's partial sum is all-reduced, the bias added once). Attention then
runs on each rank's heads alone. Embedders, modulation and the head stay replicated.

`tensor_parallel_loading(axis)` reshapes the meta model before any weight is read and tells the
loader (models/common/loading.py) which slice of each checkpoint tensor this rank reads, so no rank
ever holds the whole model. A fused weight the checkpoint stores as parts (q, k, v; FLUX's single
block q, k, v and MLP input) is split part by part, so each rank's fused projection is [q_r, k_r,
v_r(, mlp_r)]; a row linear over a concatenated input (FLUX's linear2 over [attention, MLP]) is split
segment by segment.
"""

from __future__ import annotations

import fnmatch
import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ditserve.api import InvalidRequest
from ditserve.models.common.loading import ParamShard, ShardFn, sharded_loading
from ditserve.parallel.groups import Axis

log = logging.getLogger(__name__)


class RowParallelLinear(nn.Module):
    """A linear whose input features are split across `axis`: partial products summed across ranks,
    then the (replicated) bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool, axis: Axis):
        super().__init__()
        self.axis = axis
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.axis.group)
        return y if self.bias is None else y + self.bias


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a width split across `axis` (Wan's QK norm across all heads): the sum of squares
    is all-reduced, each rank scales its own part."""

    def __init__(self, width: int, eps: float | None, axis: Axis):
        super().__init__()
        self.axis, self.width, self.eps = axis, width, eps
        self.weight = nn.Parameter(torch.empty(width // axis.size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squares = x.float().pow(2).sum(-1, keepdim=True)
        dist.all_reduce(squares, group=self.axis.group)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return (x.float() * torch.rsqrt(squares / self.width + eps)).to(x.dtype) * self.weight


def tensor_parallel_loading(axis: Axis):
    """A context in which every DiT loads as this rank's tensor-parallel shard."""
    return sharded_loading(lambda model: shard_model(model, axis))


def _matches(path: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    owner, _, attr = path.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, attr, value)


def shard_model(model: nn.Module, axis: Axis) -> ShardFn | None:
    """Turn the meta `model` into this rank's shard; returns the loader's parameter -> ParamShard map
    (None for models without a DiT plan, e.g. never reached for transformers encoders)."""
    plan = getattr(type(model), "plan", None)
    if plan is None:
        return None
    layout = plan.tensor
    if layout is None:
        raise InvalidRequest(f"{type(model).__name__} has no tensor-parallel layout: --tp-size {axis.size} is not "
                             "supported for it", "tp_size")
    heads = getattr(model.cfg, "num_attention_heads", None)
    if heads is not None and heads % axis.size:
        raise InvalidRequest(f"--tp-size {axis.size} needs the model's {heads} attention heads divisible by it",
                             "tp_size")
    names = {id(m): n for n, m in model.named_modules()}
    shards: dict[str, ParamShard] = {}
    with torch.device("meta"):
        for block in model.blocks:
            _shard_block(block, names[id(block)], layout, axis, shards)
    log.info("tensor parallel %d/%d: %d parameters sharded", axis.rank, axis.size, len(shards))
    return shards.get


def _shard_block(block: nn.Module, prefix: str, layout, axis: Axis, shards: dict) -> None:
    r, t = axis.rank, axis.size
    segments = dict(layout.row_segments)
    for path, module in list(block.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        name = f"{prefix}.{path}"
        has_bias = module.bias is not None
        if _matches(path, layout.column):
            _check(module.out_features, t, name)
            _set(block, path, nn.Linear(module.in_features, module.out_features // t, bias=has_bias))
            shards[f"{name}.weight"] = ParamShard(0, r, t)
            if has_bias:
                shards[f"{name}.bias"] = ParamShard(0, r, t)
        elif _matches(path, layout.row):
            segs = next((tuple(getattr(block, a) for a in attrs) for pat, attrs in segments.items()
                         if fnmatch.fnmatchcase(path, pat)), None)
            for seg in segs or (module.in_features,):
                _check(seg, t, name)
            _set(block, path, RowParallelLinear(module.in_features // t, module.out_features, has_bias, axis))
            shards[f"{name}.weight"] = ParamShard(1, r, t, segs)
    for path, module in list(block.named_modules()):
        if isinstance(module, nn.RMSNorm) and _matches(path, layout.norms):
            width = module.normalized_shape[-1]
            _check(width, t, f"{prefix}.{path}")
            _set(block, path, ShardedRMSNorm(width, module.eps, axis))
            shards[f"{prefix}.{path}.weight"] = ParamShard(0, r, t)
    for path in layout.divide:  # after the segments above were read at full size
        owner_path, _, attr = path.rpartition(".")
        owner = block.get_submodule(owner_path) if owner_path else block
        if isinstance(getattr(owner, attr, None), int):
            setattr(owner, attr, getattr(owner, attr) // t)


def _check(size: int, t: int, name: str) -> None:
    if size % t:
        raise InvalidRequest(f"--tp-size {t} does not divide {name} ({size} features)", "tp_size")
