"""Tensor-parallel T5 / UMT5 text encoders (T5-XXL of FLUX and SD3, UMT5-XXL of Wan), sharded while
the safetensors are read.

Megatron's pairing inside every layer, as for our DiTs (parallel/tensor.py): q, k, v and the FFN's
input (wi, or wi_0 and wi_1 when gated) are split by output features, so each rank computes its own
heads and its own part of the FFN's width; the attention output `o` and the FFN's `wo` are split by
input features and their partial sums all-reduced over the TP axis. The relative-position bias
tables are split by heads (UMT5 has one per layer; T5 only in its first layer, whose bias the later
layers reuse, so every layer sees the rank's heads), and each attention module's head count and
inner width become the rank's. The token embedding and the layer norms stay replicated.

transformers' `from_pretrained` reads every tensor whole, so the encoder is built here on the meta
device, cut, and filled from the folder's safetensors through `get_slice`: a rank reads only its
part. Heads must divide by the TP size; the FFN width need not (the tiny test encoders have 37):
ranks take `torch.tensor_split`'s pieces.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from torch import nn

from ditserve.api import InvalidRequest
from ditserve.encoders.text import pretrained_loading
from ditserve.parallel.groups import Axis
from ditserve.parallel.tensor import RowParallelLinear

log = logging.getLogger(__name__)

# [dim, start, stop) of each checkpoint tensor this rank reads, by parameter name
Cuts = dict[str, tuple[int, int, int]]


def text_encoder_tp_loading(axis: Axis):
    """A context in which `load_pretrained` builds this rank's shard of every T5 / UMT5 encoder
    (other transformers models load whole, as before)."""

    def loader(cls, folder, device, dtype):
        return load_sharded(cls, Path(folder), device, dtype, axis) if shardable(cls) else None

    return pretrained_loading(loader)


def shardable(cls) -> bool:
    """T5-family encoders, the classes this module knows how to cut."""
    return issubclass(cls, (transformers.T5EncoderModel, transformers.UMT5EncoderModel,
                            transformers.MT5EncoderModel))


def load_sharded(cls, folder: Path, device, dtype: torch.dtype, axis: Axis) -> nn.Module:
    """This rank's tensor-parallel shard of the encoder `cls` saved in `folder`, on `device` in `dtype`
    (`wo` kept in float32 where transformers keeps it), in eval mode."""
    config = cls.config_class.from_pretrained(str(folder))
    if config.num_heads % axis.size:
        raise InvalidRequest(f"--tp-size {axis.size} needs the text encoder's {config.num_heads} attention heads "
                             f"({cls.__name__} in {folder.name}) divisible by it", "tp_size")
    with torch.device("meta"):
        model = cls(config)
    cuts = shard_encoder(model, axis)
    _fill(model, folder, cuts, device, dtype)
    held = sum(p.numel() for p in model.parameters())
    log.info("%s tensor parallel %d/%d: %d tensors sharded, %d parameters held", cls.__name__, axis.rank,
             axis.size, len(cuts), held)
    return model.eval().requires_grad_(False)


def _piece(n: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s part of `n`, as `torch.tensor_split` cuts it."""
    q, rem = divmod(n, size)
    start = rank * q + min(rank, rem)
    return start, start + q + (rank < rem)


def shard_encoder(model: nn.Module, axis: Axis) -> Cuts:
    """Turn the meta encoder into this rank's shard; returns what to read of each cut parameter."""
    r, t = axis.rank, axis.size
    cuts: Cuts = {}
    with torch.device("meta"):
        for name, module in list(model.named_modules()):
            if all(hasattr(module, a) for a in ("q", "k", "v", "o", "n_heads", "key_value_proj_dim")):
                heads = module.n_heads // t
                width = heads * module.key_value_proj_dim
                for proj in ("q", "k", "v"):
                    _column(module, proj, f"{name}.{proj}", (r * width, (r + 1) * width), cuts)
                _row(module, "o", f"{name}.o", (r * width, (r + 1) * width), axis, cuts)
                if getattr(module, "has_relative_attention_bias", False):
                    buckets = module.relative_attention_bias.num_embeddings
                    module.relative_attention_bias = nn.Embedding(buckets, heads)
                    cuts[f"{name}.relative_attention_bias.weight"] = (1, r * heads, (r + 1) * heads)
                module.n_heads, module.inner_dim = heads, width
            elif isinstance(getattr(module, "wo", None), nn.Linear):
                span = _piece(module.wo.in_features, r, t)
                for proj in ("wi", "wi_0", "wi_1"):
                    if isinstance(getattr(module, proj, None), nn.Linear):
                        _column(module, proj, f"{name}.{proj}", span, cuts)
                _row(module, "wo", f"{name}.wo", span, axis, cuts)
    return cuts


def _column(owner: nn.Module, attr: str, name: str, span: tuple[int, int], cuts: Cuts) -> None:
    old = getattr(owner, attr)
    setattr(owner, attr, nn.Linear(old.in_features, span[1] - span[0], bias=old.bias is not None))
    cuts[f"{name}.weight"] = (0, *span)
    if old.bias is not None:
        cuts[f"{name}.bias"] = (0, *span)


def _row(owner: nn.Module, attr: str, name: str, span: tuple[int, int], axis: Axis, cuts: Cuts) -> None:
    old = getattr(owner, attr)
    setattr(owner, attr, RowParallelLinear(span[1] - span[0], old.out_features, old.bias is not None, axis))
    cuts[f"{name}.weight"] = (1, *span)  # a bias (none in T5) is replicated, added once after the sum


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """Every tensor name -> the safetensors file holding it (one file or a sharded index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"no model.safetensors or {index.name} in {folder}")
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def _float32_modules(model: nn.Module, dtype: torch.dtype) -> set[str]:
    """Modules transformers keeps in float32 for this dtype (T5's `wo` in float16)."""
    names: set[str] = set()
    if dtype == torch.float16:
        names |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        names |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return names


def _fill(model: nn.Module, folder: Path, cuts: Cuts, device, dtype: torch.dtype) -> None:
    """Assign every parameter of the meta `model` from the safetensors in `folder`, reading only the
    cut part of each cut tensor; tied parameters (T5's shared and encoder embeddings) stay one."""
    files = _checkpoint_files(folder)
    float32 = _float32_modules(model, dtype)
    tied: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    used: set[str] = set()
    with ExitStack() as stack:
        handles: dict[Path, object] = {}
        for names in tied.values():
            key = next((n for n in names if n in files), None)
            if key is None:
                raise ValueError(f"checkpoint in {folder} has no tensor for {names[0]}")
            used.update(n for n in names if n in files)
            if files[key] not in handles:
                handles[files[key]] = stack.enter_context(safe_open(str(files[key]), framework="pt"))
            part = handles[files[key]].get_slice(key)
            cut = cuts.get(names[0])
            if cut is None:
                tensor = part[:]
            else:
                dim, start, stop = cut
                tensor = part[(slice(None),) * dim + (slice(start, stop),)]
            expected = model.get_parameter(names[0]).shape
            if tensor.shape != expected:
                raise ValueError(f"{names[0]}: read {tuple(tensor.shape)} from {folder}, model needs {tuple(expected)}")
            keep = any(m in names[0].split(".") for m in float32)
            param = nn.Parameter(tensor.to(device=device, dtype=torch.float32 if keep else dtype), requires_grad=False)
            for name in names:
                owner, _, attr = name.rpartition(".")
                model.get_submodule(owner)._parameters[attr] = param
    unused = sorted(k for k in set(files) - used if not k.startswith("decoder."))
    if unused:
        raise ValueError(f"checkpoint in {folder} does not match {type(model).__name__}: unused tensors {unused[:5]}")
    meta = [n for n, b in model.named_buffers() if b.is_meta]
    if meta:
        raise ValueError(f"{type(model).__name__} buffers {meta[:5]} are not in the checkpoint in {folder}")
