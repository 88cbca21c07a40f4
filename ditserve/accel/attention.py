"""Attention backends: torch SDPA (default; cuDNN on Hopper), FlashAttention 3 or SageAttention
(8-bit) when installed, or "fp8" (cuDNN's fp8 SDPA with smoothed K and V: accel/attention8.py).
Chosen once at load time and set on every layer's `attn_op`; on CPU every backend is SDPA."""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

from ditserve.models.common.attention import sdpa_attention

log = logging.getLogger(__name__)


def set_path(module: nn.Module, path: str, value) -> None:
    """Set the attribute at a dotted, module-relative `path` (e.g. "attn1.attn_op")."""
    owner, _, attr = path.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, attr, value)

BACKENDS = ("auto", "sdpa", "fa3", "sage", "fp8")


def _fa3(q, k, v, mask=None):
    if mask is not None:  # padded keys: FA3's dense path has no key mask
        return sdpa_attention(q, k, v, mask=mask)
    from flash_attn_interface import flash_attn_func

    out = flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out


def _sage(q, k, v, mask=None):
    if mask is not None:
        return sdpa_attention(q, k, v, mask=mask)
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD")


def available(name: str) -> bool:
    module = {"fa3": "flash_attn_interface", "sage": "sageattention"}.get(name)
    return module is None or importlib.util.find_spec(module) is not None


def select_attention(name: str, device: torch.device):
    """The op for `name`; "auto" keeps SDPA, which on an H200 already runs cuDNN's fast kernel
    (FA3 and SageAttention are opt-in until measured here)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name in ("auto", "sdpa") or device.type != "cuda":
        if name not in ("auto", "sdpa"):
            log.info("attention backend %s needs a CUDA GPU; %s uses SDPA", name, device)
        return sdpa_attention
    if name == "fp8":
        from ditserve.accel.attention8 import fp8_attention, unsupported_reason

        reason = unsupported_reason(device)
        if reason is not None:
            raise ValueError(f"attention backend fp8 {reason}")
        return fp8_attention
    if not available(name):
        raise ValueError(f"attention backend {name} is not installed")
    return {"fa3": _fa3, "sage": _sage}[name]


def backend_sites(plan, name: str) -> tuple[str, ...]:
    """The attention sites backend `name` takes over: all the plan's, but "fp8" leaves the
    cross-attention sites to SDPA (see DiTPlan.cross_attention_sites)."""
    if name == "fp8":
        return tuple(s for s in plan.attention_sites if s not in plan.cross_attention_sites)
    return plan.attention_sites


def apply_attention(dit: nn.Module, op, sites: tuple[str, ...] | None = None) -> nn.Module:
    """Set `op` at the attention `sites` (default: every one the model's plan lists) of every block
    (the sequence-parallel wrappers do the same)."""
    sites = dit.plan.attention_sites if sites is None else sites
    for block in dit.blocks:
        for site in sites:
            set_path(block, site, op)
    log.info("attention op: %s at %s", getattr(op, "__name__", op), ", ".join(sites))
    return dit
