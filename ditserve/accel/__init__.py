"""Speed transforms applied to a loaded DiT from outside, each reading the model's plan
(models/common/plan.py): attention op, fused kernels, FP8 linears, compile, CUDA graphs per segment;
last, after any parallel wrapper, the step cache (`cache_dit`)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ditserve.api import InvalidRequest
from ditserve.config import AccelConfig

log = logging.getLogger(__name__)


def accelerate_dit(dit: nn.Module, accel: AccelConfig, device: torch.device) -> nn.Module:
    """Apply the configured transforms in the one order that composes: attention op, fused
    kernels, quantise, compile, segment graphs. `dit.plan` says where each may act."""
    plan, on_cuda = dit.plan, device.type == "cuda"
    if accel.quantization == "fp8" and not on_cuda:
        log.warning("fp8 quantization needs a CUDA GPU; running unquantised")
    if accel.attention not in ("auto", "sdpa"):
        from ditserve.accel.attention import apply_attention, backend_sites, select_attention

        try:
            dit = apply_attention(dit, select_attention(accel.attention, device),
                                  backend_sites(plan, accel.attention))
        except ValueError as exc:
            raise InvalidRequest(str(exc), "attention") from None
    if on_cuda and accel.fused_kernels and plan.qk_rope_site:
        from ditserve.accel import qk_rope

        if qk_rope.available():
            dit = qk_rope.apply_fused_qk_rope(dit, plan.qk_rope_site)
        else:
            log.warning("Triton is not installed: QK-norm + RoPE run unfused")
    if on_cuda and accel.fused_kernels and not accel.compile and plan.eager_kernels:
        from ditserve.accel import token_kernels

        if token_kernels.available():
            dit = token_kernels.apply_eager_kernels(dit, plan.eager_kernels)
        else:
            log.warning("Triton is not installed: the per-token float32 pieces run as PyTorch ops")
    if on_cuda and accel.quantization == "fp8":
        from ditserve.accel.fp8 import apply_fp8

        # row fusion: the quantiser as torch ops, which inductor folds into the kernel producing its input
        dit = apply_fp8(dit, triton_quant=accel.fused_kernels and not (accel.compile and accel.row_fusion),
                        fast_accum=accel.fp8_fast_accum)
    if accel.compile:
        from ditserve.accel.compile import apply_compile

        dit = apply_compile(dit, wide=accel.row_fusion)
        if on_cuda and accel.cuda_graphs:
            from ditserve.accel.segments import SegmentedDiT

            dit = SegmentedDiT(dit, graphs=True)
    return dit


def cache_dit(dit: nn.Module, accel: AccelConfig, device: torch.device, groups=None) -> nn.Module:
    """`dit` with the configured step cache (accel/cache.py), outermost: it takes over the segment
    graphs and runs over a parallel wrapper, with the change measure summed over the sequence shards
    and the skip decision agreed by every rank of the replica (`groups`: parallel/groups.py)."""
    if not accel.cache.enabled:
        return dit
    from ditserve.accel.cache import apply_cache

    sp_group = sync_group = None
    if groups is not None and groups.world > 1:
        sp_group = groups.sp.group if groups.sp.size > 1 else None
        sync_group = groups.control
    return apply_cache(dit, accel.cache, graphs=device.type == "cuda" and accel.compile and accel.cuda_graphs,
                       sp_group=sp_group, sync_group=sync_group)
