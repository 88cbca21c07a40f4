"""Activation memory of a DiT call: forward chunking over the sequence, and an estimate of the
activation peak, both read from the model's plan.

- `apply_forward_chunking(dit, chunk_size)` (diffusers' `enable_forward_chunking(chunk_size, dim=1)`):
  every piece of a block that maps each token on its own (`DiTPlan.token_sites`: the feed-forwards,
  and where a model declares them the modulated norms, gated residuals, rotary embedding and
  cross-attention) runs over `chunk_size` tokens at a time, written into one preallocated output
  (or back into its input, `token_sites_in_place`), so its float32 and 4x-wide temporaries are only
  ever `chunk_size` tokens long; only the self-attention sees the whole sequence. Chunks are a multiple of `CHUNK_ALIGN` tokens, the last one taking the remainder
  (between one and two chunks long): every chunk's GEMM and elementwise kernels then see the same
  whole-vector layout as the unchunked call, and on the CPU in float32 the output is bit-identical.
  `disable_forward_chunking(dit)` undoes it.
- `estimate_activation_peak(dit, inputs)`: the largest amount of memory that tensors created during
  one call of `dit` hold at once, counted op by op with every tensor's lifetime (a dispatch mode;
  the weights are not counted). On a DiT built on the `meta` device it runs at full size (75,600
  tokens of a 720p x 81 video) in under a second on the CPU, computing nothing; attention counts as a
  flash-style kernel (its output only), as on the GPU. The allocator's slack and kernel
  workspaces come on top.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ditserve.accel.attention import set_path
from ditserve.models.common.rope import Rotary

log = logging.getLogger(__name__)

GIB = 2**30
CHUNK_ALIGN = 64  # tokens: chunk sizes are rounded up to a multiple of this
AUTO_CHUNK_TOKENS = 4096  # the automatic chunk (layerwise offload): a GEMM of 4096 rows runs at full rate


def align_chunk(chunk_size: int) -> int:
    """`chunk_size` tokens rounded up to a multiple of CHUNK_ALIGN."""
    return max(CHUNK_ALIGN, -(-chunk_size // CHUNK_ALIGN) * CHUNK_ALIGN)


def chunk_ranges(length: int, chunk: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of `chunk` tokens covering `length`, the last one taking the remainder."""
    n = max(1, length // chunk)
    bounds = [k * chunk for k in range(n)] + [length]
    return list(zip(bounds[:-1], bounds[1:]))


def _cut(arg, length: int, a: int, b: int, dim: int):
    """Tokens [a, b) of a per-token argument; anything else (broadcast, not a tensor) whole."""
    if isinstance(arg, torch.Tensor) and arg.ndim > dim and arg.shape[dim] == length:
        return arg.narrow(dim, a, b - a)
    if isinstance(arg, Rotary) and arg.cos.shape[0] == length:
        return Rotary(arg.cos[a:b], arg.sin[a:b])
    return arg


def chunked_call(fn: Callable[..., torch.Tensor], chunk: int, dim: int, x: torch.Tensor, *args,
                 _in_place: bool = False, **kwargs):
    """`fn(x, *args, **kwargs)` computed `chunk` tokens (dim `dim` of `x`) at a time into one output:
    positional arguments with as many tokens as `x` are cut with it, the rest passed whole. `_in_place`:
    the output is `x` itself (each chunk's result written back over its own tokens) when it fits."""
    length = x.shape[dim]
    ranges = chunk_ranges(length, chunk)
    if len(ranges) == 1:
        return fn(x, *args, **kwargs)
    out = None
    for a, b in ranges:
        y = fn(x.narrow(dim, a, b - a), *(_cut(t, length, a, b, dim) for t in args), **kwargs)
        if out is None:
            shape = list(y.shape)
            shape[dim] = length
            fits = _in_place and list(x.shape) == shape and x.dtype == y.dtype and x.is_contiguous()
            out = x if fits else y.new_empty(shape)
        dst = out.narrow(dim, a, b - a)
        if torch.compiler.is_compiling() or not (y.data_ptr() == dst.data_ptr() and y.stride() == dst.stride()):
            dst.copy_(y)  # unless fn wrote the chunk in place itself (eager kernels: accel/token_kernels.py)
        del y, dst
    return out


def _sites(dit: nn.Module, paths: tuple[str, ...] | None = None) -> list[tuple[nn.Module, str]]:
    """(owner, attribute) of every token site the plan declares (or of `paths`), over every block (a
    site a block lacks, or holds as None, is skipped: a single-stream block has no MLP of its own)."""
    found = []
    for block in dit.blocks:
        for path in dit.plan.token_sites if paths is None else paths:
            owner_path, _, attr = path.rpartition(".")
            try:
                owner = block.get_submodule(owner_path) if owner_path else block
            except AttributeError:
                continue
            if getattr(owner, attr, None) is not None:
                found.append((owner, attr))
    return found


_UNCHUNKED = "_ditserve_unchunked"
_CHUNK = "_ditserve_chunk"  # (chunk, dim, in_place) on a chunked feed-forward module
_CHUNKED_CLASSES: dict[type, type] = {}


def _chunked_class(cls: type) -> type:
    """`cls` with a forward that runs over the chunk its instance holds. A feed-forward site changes
    class rather than getting a per-instance forward: every block's module then has the same type and
    forward, so torch.compile makes one graph for all blocks (a per-instance partial is a new object to
    guard on in each block, which recompiles per block and fails past dynamo's recompile limit)."""
    if cls in _CHUNKED_CLASSES.values():
        return cls
    if cls not in _CHUNKED_CLASSES:
        def forward(self, x, *args, **kwargs):
            chunk, dim, in_place = getattr(self, _CHUNK)
            return chunked_call(functools.partial(cls.forward, self), chunk, dim, x, *args, _in_place=in_place,
                                **kwargs)

        _CHUNKED_CLASSES[cls] = type(f"Chunked{cls.__name__}", (cls,), {"forward": forward,
                                                                         "__module__": cls.__module__})
    return _CHUNKED_CLASSES[cls]


def _unchunked_class(cls: type) -> type:
    return next((base for base, sub in _CHUNKED_CLASSES.items() if sub is cls), cls)


def apply_forward_chunking(dit: nn.Module, chunk_size: int, dim: int = 1) -> int:
    """Run each token site of `dit`'s plan over `chunk_size` tokens (rounded up to a multiple of
    CHUNK_ALIGN) of dim `dim` at a time; returns how many sites were set (0: the plan declares none).
    Applying again changes the chunk size."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size!r}")
    chunk = align_chunk(chunk_size)
    sites = _sites(dit)
    in_place = {(id(o), a) for o, a in _sites(dit, dit.plan.token_sites_in_place)}
    for owner, attr in sites:
        extra = {"_in_place": True} if (id(owner), attr) in in_place else {}
        target = getattr(owner, attr)
        if isinstance(target, nn.Module):  # a feed-forward: it stays a child module, of a chunking class
            target.__class__ = _chunked_class(type(target))
            target.__dict__[_CHUNK] = (chunk, dim, bool(extra))
            continue
        saved = owner.__dict__.get(_UNCHUNKED, {})
        if attr not in saved:
            saved[attr] = (owner.__dict__.get(attr), getattr(owner, attr))  # (instance value, callable)
        fn = saved[attr][1]
        owner.__dict__[_UNCHUNKED] = saved
        owner.__dict__[attr] = functools.partial(chunked_call, fn, chunk, dim, **extra)
    log.info("forward chunking: %d sites, %d tokens at a time", len(sites), chunk)
    return len(sites)


def disable_forward_chunking(dit: nn.Module) -> None:
    """Undo `apply_forward_chunking`."""
    for owner, attr in _sites(dit):
        target = getattr(owner, attr)
        if isinstance(target, nn.Module):
            target.__class__ = _unchunked_class(type(target))
            target.__dict__.pop(_CHUNK, None)
            continue
        for name, (instance_value, _) in owner.__dict__.pop(_UNCHUNKED, {}).items():
            if instance_value is None:
                del owner.__dict__[name]
            else:
                owner.__dict__[name] = instance_value


def forward_chunk_size(chunk_size: int | None, cpu_offload: str) -> int | None:
    """The chunk the memory flags ask for (`--forward-chunk-size`): `chunk_size` tokens, 0 off, None
    automatic: AUTO_CHUNK_TOKENS under layerwise offload (where activations are what is left to
    fit; accel/offload.py drops it at the DiT's first call where the whole activations fit), else off."""
    if chunk_size is None:
        return AUTO_CHUNK_TOKENS if cpu_offload == "layerwise" else None
    return chunk_size or None


# --- the activation peak -----------------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages that ops create while it is active, each until its last
    tensor dies; `peak` is the most held at once."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]

    def __exit__(self, *exc):
        self._sweep()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self.live or key in inputs:  # a view, or written in place
                continue
            self.live[key] = (StorageWeakRef(storage), storage.nbytes())
            self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        return out


class _FusedAsOnGPU(TorchFunctionMode):
    """On meta tensors, RMSNorm as one fused kernel holds it, as CUDA runs it: its output (elsewhere
    it decomposes into float32 temporaries that the GPU never allocates)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.rms_norm and args[0].is_meta:
            return torch.empty_like(args[0])
        return func(*args, **(kwargs or {}))


def _flash_like(q, k, v, mask=None):
    """Attention as a fused kernel holds it: its output (the log-sum-exp and workspace are small)."""
    return torch.empty_like(q)


@contextmanager
def _attention_as_kernel(dit: nn.Module):
    saved = []
    for block in dit.blocks:
        for path in dit.plan.attention_sites:
            owner, _, attr = path.rpartition(".")
            try:
                holder = block.get_submodule(owner) if owner else block
            except AttributeError:
                continue
            if hasattr(holder, attr):
                saved.append((block, path, getattr(holder, attr)))
                set_path(block, path, _flash_like)
    try:
        yield
    finally:
        for block, path, op in saved:
            set_path(block, path, op)


@dataclass(frozen=True)
class ActivationPeak:
    """`peak_bytes` held at once by a DiT call's activations over `tokens` tokens (all streams)."""

    peak_bytes: int
    tokens: int

    @property
    def per_token(self) -> float:
        return self.peak_bytes / max(self.tokens, 1)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB


def estimate_activation_peak(dit: nn.Module, inputs, call: Callable | None = None) -> ActivationPeak:
    """The activation peak of `call(inputs)` (default: `dit`'s plain forward), op by op, attention
    counted as a fused kernel. Build `dit` and `inputs` on the `meta` device to estimate at full size
    for free. The plain forward runs each kind of block once per input shape: a block like one already
    run over the same shapes would hold the same tensors again, and changes no shape."""
    with torch.no_grad(), _attention_as_kernel(dit):
        hidden = dit.embed(inputs)
        tokens = sum(s.shape[1] for s in hidden.streams)
        del hidden
        meter = LiveBytes()
        with _FusedAsOnGPU(), meter:
            out = call(inputs) if call is not None else _forward_once_per_kind(dit, inputs)
        del out
    return ActivationPeak(meter.peak, tokens)


def _forward_once_per_kind(dit: nn.Module, inputs) -> torch.Tensor:
    from ditserve.models.common.dit import run_block

    h, seen = dit.embed(inputs), set()
    for block in dit.blocks:
        key = (type(block), tuple(tuple(s.shape) for s in h.streams))
        if key not in seen:
            seen.add(key)
            h = run_block(block, h)
    return dit.head(h)


def estimate_call(dit: nn.Module, args: tuple, kwargs: dict | None = None) -> ActivationPeak:
    """The activation peak of the call `dit(*args, **kwargs)` (a DiT, or a wrapper around one), on a
    meta copy of the DiT with the same forward chunking and the arguments' shapes."""
    from ditserve.accel.offload import to_device
    from ditserve.models.common.dit import DiTWrapper

    inner = dit
    while isinstance(inner, DiTWrapper):
        inner = inner.dit
    sizes: dict[torch.dtype, int] = {}
    for p in inner.parameters():  # the model dtype: most of the weights (not fp8 copies, not float32 norms)
        if p.dtype in (torch.bfloat16, torch.float16, torch.float32):
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    dtype = max(sizes, key=sizes.get)
    meta = meta_copy(type(inner), inner.cfg, dtype)
    chunk = chunk_of(inner)
    if chunk:
        apply_forward_chunking(meta, chunk)
    meta_args = to_device(tuple(args[:1]), torch.device("meta"))
    return estimate_activation_peak(meta, meta_args[0])


def chunk_of(dit: nn.Module) -> int | None:
    """The token chunk `dit`'s sites run with (None: not chunked)."""
    for owner, attr in _sites(dit):
        target = getattr(owner, attr)
        if isinstance(target, nn.Module):
            if _CHUNK in target.__dict__:
                return target.__dict__[_CHUNK][0]
            continue
        fn = owner.__dict__.get(attr)
        if isinstance(fn, functools.partial) and fn.func is chunked_call:
            return fn.args[1]
    return None


def meta_copy(model_cls, cfg, dtype: torch.dtype) -> nn.Module:
    """`model_cls(cfg)` on the meta device in `dtype` (for `estimate_activation_peak`)."""
    with torch.device("meta"):
        return model_cls(cfg).to(dtype).eval()


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if math.isfinite(n) else "-"
