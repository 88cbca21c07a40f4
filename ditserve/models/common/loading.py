"""Fill a model built on the meta device from diffusers safetensors.

A key map names, for each of our parameters, the checkpoint tensors that make it (several are
concatenated along dim 0, e.g. separate q/k/v into one fused projection).

`load_into` reads the files itself (the safetensors header gives each tensor's byte range): each
parameter's final tensor is allocated once and its checkpoint tensors are read straight into it
with `os.preadv` (no mmap, no intermediate copy; a fused projection's parts land in their slices),
in parallel threads (`load_workers`, the reads release the GIL). A parameter whose load dtype
differs from the file's is read into a buffer of the file's dtype and converted (one tensor held
twice, never the model); on CUDA, each thread reads into its own pinned staging buffer and copies
to the GPU from there, converting on the GPU. So a 24 GB checkpoint needs 24 GB, on the host or the
device, and is read as fast as the disk and the copies allow.

Inside `sharded_loading(hook)` (tensor parallelism, set by parallel/), `hook(model)` may reshape the
meta model to one rank's shard and name, per parameter, the part of each checkpoint tensor to read
(`ParamShard`); files are then read slice by slice, so no rank ever holds the whole model.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
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


_PINNED: ContextVar[bool] = ContextVar("ditserve_pinned_loading", default=False)


@contextmanager
def pinned_loading(enabled: bool = True) -> Iterator[None]:
    """While active, DiTs loaded on the CPU are read straight into pinned memory (CPU offload on a
    GPU: the host copies it streams from need no second, pinned copy)."""
    token = _PINNED.set(enabled)
    try:
        yield
    finally:
        _PINNED.reset(token)


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


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class Entry:
    """Where one checkpoint tensor lies: its file, dtype, shape and absolute byte range."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_entries(files: dict[str, Path]) -> dict[str, Entry]:
    """Each tensor's Entry, from the header of each safetensors file (read once per file)."""
    entries: dict[str, Entry] = {}
    for path in sorted(set(files.values())):
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for key, info in header.items():
            if key == "__metadata__" or files.get(key) != path:
                continue
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{path.name}: tensor {key} has dtype {info['dtype']}, which is not supported")
            start, stop = info["data_offsets"]
            entries[key] = Entry(path, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + start,
                                 stop - start)
    return entries


def load_workers() -> int:
    """Threads reading checkpoint files: $DITSERVE_LOAD_WORKERS, else up to 8 (one per core)."""
    from ditserve.config.env import load_workers as configured

    return configured() or max(1, min(8, os.cpu_count() or 1))


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of contiguous CPU tensor `t`'s memory."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


class _Files:
    """Open file descriptors, one per checkpoint file, shared by the reading threads (pread keeps no
    position, so they need no lock)."""

    def __init__(self):
        self.fds: dict[Path, int] = {}
        self.lock = threading.Lock()

    def read(self, entry: Entry, out: memoryview) -> None:
        fd = self.fds.get(entry.path)
        if fd is None:
            with self.lock:
                fd = self.fds.get(entry.path)
                if fd is None:
                    fd = self.fds[entry.path] = os.open(entry.path, os.O_RDONLY)
        done = 0
        while done < entry.nbytes:
            n = os.preadv(fd, [out[done:entry.nbytes]], entry.offset + done)
            if n <= 0:
                raise OSError(f"{entry.path.name}: the file ends inside a tensor")
            done += n

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class _Staging(threading.local):
    """One pinned host buffer per reading thread (CUDA loads), grown to the largest tensor it reads,
    and the thread's own CUDA stream for the copies."""

    buffer: torch.Tensor | None = None
    stream = None


def read_parameter(files: _Files, entries: list[Entry], shape: torch.Size, device: torch.device,
                   dtype: torch.dtype, staging: _Staging | None = None) -> torch.Tensor:
    """One parameter of `shape` from its checkpoint tensors (concatenated along dim 0), read straight
    into its final tensor on `device` in `dtype`."""
    file_dtype = entries[0].dtype
    rows = sum(e.shape[0] if e.shape else 1 for e in entries)
    if any(e.dtype != file_dtype for e in entries) or (
            len(entries) > 1 and (rows != shape[0] or any(tuple(e.shape[1:]) != tuple(shape[1:]) for e in entries))):
        raise ValueError(f"checkpoint tensors of shapes {[e.shape for e in entries]} do not make {tuple(shape)}")
    if len(entries) == 1 and tuple(entries[0].shape) != tuple(shape):
        raise ValueError(f"checkpoint shape {entries[0].shape} != model shape {tuple(shape)}")
    total = sum(e.nbytes for e in entries)
    if device.type == "cuda":
        if staging.stream is None:  # a new thread's current device is GPU 0: never touch it by mistake
            torch.cuda.set_device(device)
            staging.stream = torch.cuda.Stream(device)
        if staging.buffer is None or staging.buffer.numel() < total:
            staging.buffer = None
            staging.buffer = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        host = staging.buffer[:total]
    else:  # pinned: for CPU offload, and only when no conversion follows
        pin = device.type == "cpu" and file_dtype == dtype and _PINNED.get()
        host = torch.empty(shape, dtype=file_dtype, pin_memory=pin)
    view, at = _bytes_of(host), 0
    for e in entries:
        files.read(e, view[at:at + e.nbytes])
        at += e.nbytes
    if device.type == "cuda":
        with torch.cuda.stream(staging.stream):
            out = host.view(file_dtype).view(shape).to(device, non_blocking=True).to(dtype)
        staging.stream.synchronize()  # the staging buffer is reused by this thread's next read
        return out
    return (host if file_dtype == dtype else host.to(dtype)).to(device)  # (a no-op on the CPU)


def load_into(
    model: nn.Module,
    folder: Path,
    key_map: KeyMap,
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    dtype_for: Callable[[str], torch.dtype | None] | None = None,
    ignore: Callable[[str], bool] | None = None,
) -> nn.Module:
    """Assign each parameter of `model` (on meta) from the checkpoint in `folder`, strictly: in
    parallel, each read straight into its final tensor (module docstring). `dtype_for(key)`: a
    dtype for the parameters made from checkpoint tensor `key` other than `dtype` (None: `dtype`);
    `ignore(key)`: checkpoint tensors the model does not use."""
    files = checkpoint_files(folder)
    if ignore is not None:
        files = {key: path for key, path in files.items() if not ignore(key)}
    if _SHARDING.get() is None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        try:
            return _load_parallel(model, folder, key_map, files, device, dtype, dtype_for)
        except (RuntimeError, OSError, TypeError, AttributeError) as exc:  # not a mismatch (ValueError)
            log.warning("parallel read of %s failed (%s: %s); reading it through safetensors instead", folder,
                        type(exc).__name__, exc)
    handles: dict[Path, object] = {}

    def handle(key: str):
        path = files[key]
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path]

    def get_tensor(key: str) -> torch.Tensor:
        t = handle(key).get_tensor(key)
        return t if dtype_for is None or dtype_for(key) is None else t.to(device=device, dtype=dtype_for(key))

    assign_mapped(model, key_map, set(files), get_tensor, device, dtype if dtype_for is None else None,
                  where=str(folder), get_slice=lambda key: handle(key).get_slice(key),
                  dtype_of=None if dtype_for is None else lambda key: dtype_for(key) or dtype)
    log.debug("loaded %d tensors from %s", len(key_map), folder)
    return model


def _check_mapping(model: nn.Module, key_map: KeyMap, available: set[str], where: str) -> dict[str, nn.Parameter]:
    ours = dict(model.named_parameters())
    wanted = {k for srcs in key_map.values() for k in srcs}
    missing, unused, absent = sorted(set(ours) - set(key_map)), sorted(available - wanted), sorted(wanted - available)
    if missing or unused or absent:
        raise ValueError(
            f"checkpoint in {where} does not match the model: "
            f"unmapped parameters {missing[:5]}, unused tensors {unused[:5]}, absent tensors {absent[:5]}"
        )
    return ours


def _load_parallel(model: nn.Module, folder: Path, key_map: KeyMap, files: dict[str, Path], device: torch.device,
                   dtype: torch.dtype, dtype_for) -> nn.Module:
    start = time.perf_counter()
    ours = _check_mapping(model, key_map, set(files), str(folder))
    entries = read_entries(files)
    reader, staging = _Files(), _Staging()
    pinned = _PINNED.get()

    def one(name: str) -> tuple[str, torch.Tensor]:
        _PINNED.set(pinned)  # a worker thread starts with the default context
        sources = key_map[name]
        target = (dtype_for(sources[0]) if dtype_for is not None else None) or dtype
        try:
            return name, read_parameter(reader, [entries[k] for k in sources], ours[name].shape, device, target,
                                        staging)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None

    workers = load_workers()
    total = 0
    try:
        # largest first, so that no thread is left with a big tensor at the end
        names = sorted(key_map, key=lambda n: -sum(entries[k].nbytes for k in key_map[n]))
        with ThreadPoolExecutor(workers, thread_name_prefix="ditserve-load") as pool:
            for name, tensor in pool.map(one, names):
                _assign(model, name, tensor)
                total += tensor.numel() * tensor.element_size()
    finally:
        reader.close()
        del staging  # each thread's pinned buffer; then the host allocator's cache lets them go
        if device.type == "cuda" and hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()
    seconds = time.perf_counter() - start
    log.info("read %.2f GiB from %s in %.2f s (%.2f GiB/s, %d threads)", total / 2**30, folder, seconds,
             total / 2**30 / max(seconds, 1e-9), workers)
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
    dtype_of: Callable[[str], torch.dtype] | None = None,
) -> nn.Module:
    """Fill every parameter of `model` from `get_tensor` through `key_map`; nothing may be left over.
    Under `sharded_loading`, sharded parameters are read through `get_slice(key)` (a safetensors
    slice: `get_shape()`, indexing reads only the part asked for); without it, whole, then cut."""
    hook = _SHARDING.get()
    shard_of = hook(model) if hook is not None else None
    ours = _check_mapping(model, key_map, available, where)
    for name, sources in key_map.items():
        shard = shard_of(name) if shard_of is not None else None
        if shard is None:
            parts = [get_tensor(src) for src in sources]
        else:
            parts = [_read_shard(src, shard, get_tensor, get_slice) for src in sources]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=shard.dim if shard else 0)
        if tensor.shape != ours[name].shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(ours[name].shape)}")
        _assign(model, name, tensor.to(device=device, dtype=dtype if dtype_of is None else dtype_of(sources[0])))
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
