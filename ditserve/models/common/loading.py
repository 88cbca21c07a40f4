"""Fill a model built on the meta device from diffusers safetensors, one tensor at a time.

A key map names, for each of our parameters, the checkpoint tensors that make it (several are
concatenated along dim 0, e.g. separate q/k/v into one fused projection). Only the tensor being
placed is ever held twice, so a 24 GB checkpoint never needs 48 GB.

Inside `sharded_loading(hook)` (tensor parallelism, set by parallel/), `hook(model)` may reshape the
meta model to one rank's shard and name, per parameter, the part of each checkpoint tensor to read
(`ParamShard`); files are then read slice by slice, so no rank ever holds the whole model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

log = logging.getLogger(__name__)

KeyMap = dict[str, list[str]]


@dataclass(frozen=True)
class ParamShard:
    """This rank's part of a parameter: along `dim`, piece `rank` of `size` of every checkpoint
    tensor that makes it (each of a fused q/k/v cut on its own). `segments`: sizes along `dim` of
    consecutive parts of one tensor that are each cut on their own (a projection whose input is a
    concatenation); None: the tensor is one segment."""

    dim: int
    rank: int
    size: int
    segments: tuple[int, ...] | None = None

    def ranges(self, length: int) -> list[tuple[int, int]]:
        """[start, stop) ranges along `dim` of a checkpoint tensor of `length` to read, in order."""
        out, start = [], 0
        for seg in self.segments or (length,):
            if seg % self.size:
                raise ValueError(f"a segment of {seg} does not split into {self.size} shards")
            piece = seg // self.size
            out.append((start + self.rank * piece, start + (self.rank + 1) * piece))
            start += seg
        return out


ShardFn = Callable[[str], ParamShard | None]
_SHARDING: ContextVar[Callable[[nn.Module], ShardFn | None] | None] = ContextVar("ditserve_sharding", default=None)


@contextmanager
def sharded_loading(hook: Callable[[nn.Module], ShardFn | None]) -> Iterator[None]:
    """While active, every model filled by `assign_mapped` is first passed to `hook`, which may
    turn the meta model into one rank's shard and return which part of each parameter to read."""
    token = _SHARDING.set(hook)
    try:
        yield
    finally:
        _SHARDING.reset(token)


def checkpoint_files(folder: Path, stem: str = "diffusion_pytorch_model") -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it (single file or sharded index)."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    single = folder / f"{stem}.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"no {stem}.safetensors or {index.name} in {folder}")
    with safe_open(str(single), framework="pt") as f:
        return {key: single for key in f.keys()}


def load_into(
    model: nn.Module,
    folder: Path,
    key_map: KeyMap,
    device: torch.device | str,
    dtype: torch.dtype,
) -> nn.Module:
    """Assign each parameter of `model` (on meta) from the checkpoint in `folder`, strictly."""
    files = checkpoint_files(folder)
    handles: dict[Path, object] = {}

    def handle(key: str):
        path = files[key]
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path]

    assign_mapped(model, key_map, set(files), lambda key: handle(key).get_tensor(key), device, dtype,
                  where=str(folder), get_slice=lambda key: handle(key).get_slice(key))
    log.debug("loaded %d tensors from %s", len(key_map), folder)
    return model


def assign_mapped(
    model: nn.Module,
    key_map: KeyMap,
    available: set[str],
    get_tensor: Callable[[str], torch.Tensor],
    device: torch.device | str,
    dtype: torch.dtype,
    where: str = "state dict",
    get_slice: Callable[[str], object] | None = None,
) -> nn.Module:
    """Fill every parameter of `model` from `get_tensor` through `key_map`; nothing may be left over.
    Under `sharded_loading`, sharded parameters are read through `get_slice(key)` (a safetensors
    slice: `get_shape()`, indexing reads only the part asked for); without it, whole, then cut."""
    hook = _SHARDING.get()
    shard_of = hook(model) if hook is not None else None
    ours = dict(model.named_parameters())
    wanted = {k for srcs in key_map.values() for k in srcs}
    missing, unused, absent = sorted(set(ours) - set(key_map)), sorted(available - wanted), sorted(wanted - available)
    if missing or unused or absent:
        raise ValueError(
            f"checkpoint in {where} does not match the model: "
            f"unmapped parameters {missing[:5]}, unused tensors {unused[:5]}, absent tensors {absent[:5]}"
        )
    for name, sources in key_map.items():
        shard = shard_of(name) if shard_of is not None else None
        if shard is None:
            parts = [get_tensor(src) for src in sources]
        else:
            parts = [_read_shard(src, shard, get_tensor, get_slice) for src in sources]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=shard.dim if shard else 0)
        if tensor.shape != ours[name].shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(ours[name].shape)}")
        _assign(model, name, tensor.to(device=device, dtype=dtype))
    return model


def _read_shard(key: str, shard: ParamShard, get_tensor, get_slice) -> torch.Tensor:
    """This rank's part of one checkpoint tensor: only its slices are read when the file allows."""
    if get_slice is None:
        full = get_tensor(key)
        pieces = [full.narrow(shard.dim, a, b - a).clone() for a, b in shard.ranges(full.shape[shard.dim])]
    else:
        part = get_slice(key)
        lead = (slice(None),) * shard.dim
        pieces = [part[lead + (slice(a, b),)] for a, b in shard.ranges(part.get_shape()[shard.dim])]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=shard.dim)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


def linear_keys(ours: str, *theirs: str) -> KeyMap:
    """Weight and bias of our Linear `ours` from one or more (concatenated) checkpoint Linears."""
    return {
        f"{ours}.weight": [f"{t}.weight" for t in theirs],
        f"{ours}.bias": [f"{t}.bias" for t in theirs],
    }


def double_block_keys(o: str, t: str, *, img_mod: str, txt_mod: str, img_mlp: str, txt_mlp: str) -> KeyMap:
    """Our MMDiT DoubleStreamBlock `o` from a diffusers dual-stream block `t` (FLUX, Qwen-Image):
    fused q/k/v per stream; the families differ only in the names of modulation and MLP modules."""
    m: KeyMap = {}
    m |= linear_keys(f"{o}.img_mod.lin", f"{t}.{img_mod}")
    m |= linear_keys(f"{o}.txt_mod.lin", f"{t}.{txt_mod}")
    m |= linear_keys(f"{o}.img_attn.qkv", f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v")
    m |= linear_keys(f"{o}.txt_attn.qkv", f"{t}.attn.add_q_proj", f"{t}.attn.add_k_proj", f"{t}.attn.add_v_proj")
    m |= linear_keys(f"{o}.img_attn.proj", f"{t}.attn.to_out.0")
    m |= linear_keys(f"{o}.txt_attn.proj", f"{t}.attn.to_add_out")
    m[f"{o}.img_attn.norm.q_norm.weight"] = [f"{t}.attn.norm_q.weight"]
    m[f"{o}.img_attn.norm.k_norm.weight"] = [f"{t}.attn.norm_k.weight"]
    m[f"{o}.txt_attn.norm.q_norm.weight"] = [f"{t}.attn.norm_added_q.weight"]
    m[f"{o}.txt_attn.norm.k_norm.weight"] = [f"{t}.attn.norm_added_k.weight"]
    for ours, theirs in (("img_mlp", img_mlp), ("txt_mlp", txt_mlp)):
        m |= linear_keys(f"{o}.{ours}.0", f"{t}.{theirs}.net.0.proj")
        m |= linear_keys(f"{o}.{ours}.2", f"{t}.{theirs}.net.2")
    return m


def load_dit(folder: str | Path, cfg_cls, model_cls, key_map_fn, device, dtype: torch.dtype) -> nn.Module:
    """Read `config.json` into `cfg_cls`, build `model_cls` on the meta device, fill it from the
    diffusers safetensors in `folder` through `key_map_fn(cfg)`."""
    folder = Path(folder)
    cfg = cfg_cls.from_json(folder / "config.json")
    with torch.device("meta"):
        model = model_cls(cfg)
    load_into(model, folder, key_map_fn(cfg), device, dtype)
    return model.eval()
