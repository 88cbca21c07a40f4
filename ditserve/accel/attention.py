"""Attention backends: torch SDPA (default; cuDNN on Hopper), FlashAttention 3 or SageAttention
(8-bit) when installed, and our own 8-bit Triton kernel ("fp8", accel/fp8_attention.py). Chosen
once at load time and set on every layer's `attn_op`."""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

from ditserve.models.common.attention import sdpa_attention

log = logging.getLogger(__name__)

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
    module = {"fa3": "flash_attn_interface", "sage": "sageattention", "fp8": "triton"}.get(name)
    return module is None or importlib.util.find_spec(module) is not None


def select_attention(name: str, device: torch.device):
    """The op for `name`; "auto" keeps SDPA, which on an H200 already runs cuDNN's fast kernel
    (FA3, SageAttention and fp8 are opt-in until measured here). "fp8" needs Triton; its module is
    imported only here, so installs without Triton still import ditserve."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name in ("auto", "sdpa") or device.type != "cuda":
        return sdpa_attention
    if not available(name):
        raise ValueError(f"attention backend {name} is not installed")
    if name == "fp8":
        from ditserve.accel.fp8_attention import fp8_attention

        return fp8_attention
    return {"fa3": _fa3, "sage": _sage}[name]


def apply_attention(dit: nn.Module, op) -> nn.Module:
    """Set `op` on every block that has an `attn_op` (the sequence-parallel wrappers do the same)."""
    for block in dit.blocks:
        block.attn_op = op
    log.info("attention op: %s", getattr(op, "__name__", op))
    return dit
