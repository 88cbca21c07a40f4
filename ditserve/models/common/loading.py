"""Fill a model built on the meta device from diffusers safetensors, one tensor at a time.

A key map names, for each of our parameters, the checkpoint tensors that make it (several are
concatenated along dim 0, e.g. separate q/k/v into one fused projection). Only the tensor being
placed is ever held twice, so a 24 GB checkpoint never needs 48 GB.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

log = logging.getLogger(__name__)

KeyMap = dict[str, list[str]]


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

    def get_tensor(key: str) -> torch.Tensor:
        path = files[key]
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(key)

    assign_mapped(model, key_map, set(files), get_tensor, device, dtype, where=str(folder))
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
) -> nn.Module:
    """Fill every parameter of `model` from `get_tensor` through `key_map`; nothing may be left over."""
    ours = dict(model.named_parameters())
    wanted = {k for srcs in key_map.values() for k in srcs}
    missing, unused, absent = sorted(set(ours) - set(key_map)), sorted(available - wanted), sorted(wanted - available)
    if missing or unused or absent:
        raise ValueError(
            f"checkpoint in {where} does not match the model: "
            f"unmapped parameters {missing[:5]}, unused tensors {unused[:5]}, absent tensors {absent[:5]}"
        )
    for name, sources in key_map.items():
        parts = [get_tensor(src) for src in sources]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if tensor.shape != ours[name].shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(ours[name].shape)}")
        _assign(model, name, tensor.to(device=device, dtype=dtype))
    return model


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
