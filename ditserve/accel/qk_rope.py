"""Fused QK-RMSNorm + RoPE + joint concatenation: one Triton pass per stream instead of inductor's
norm, rotate, concatenate and layout kernels (≈ 6.6 ms of FLUX.1-dev's bf16 step on an H200).

Same contract as `models.common.mmdit.norm_rope_qkv`: each stream's projection [B, S_i, 3·H·Dh]
(any row stride, e.g. a slice of a wider projection) is read once; q and k are normalised with the
stream's weights and rotated, v is copied, all written straight into the joint [B, ΣS_i, H, Dh]
tensors that attention reads. Math in float32, one rounding at the store.

On by default with `AccelConfig.fused_kernels`; tests/gpu checks it against the reference on the
device, alone and inside compiled blocks (benchmarks/NOTES.md has its history).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ditserve.models.common.mmdit import norm_rope_qkv

log = logging.getLogger(__name__)
# tokens per program (of one head), warps: the fastest of 8 tiles on the H200 (qk_kernel_variants.py)
BLOCK_T, NUM_WARPS = 8, 2

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path serves
    triton = None

if triton is not None:

    @triton.jit
    def _norm_rope_rows(src, batch_stride, row_stride, qw, kw, cos, sin, q_out, k_out, v_out,
                        seq_part, seq_total, row0, eps,
                        H: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr):
        """Grid (token blocks, heads, batch): BLOCK_T tokens of one head of one stream; q and k
        normalised and rotated, v copied, all written at rows row0.. of the joint [B, S, H, D].

        Rows are loaded whole (contiguous); each element's pair partner (d ^ 1) is loaded again from
        the same cache lines, so the rotation y·cos ± y_partner·sin needs no reshape or split."""
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        live = (t < seq_part)[:, None]
        d = tl.arange(0, D)[None, :]
        partner = d ^ 1
        rows = src + b * batch_stride + t[:, None].to(tl.int64) * row_stride + h * D
        out_rows = ((b * seq_total + row0 + t[:, None]) * H + h) * D
        table = (row0 + t[:, None]) * D + d
        c = tl.load(cos + table, mask=live, other=0.0)
        s = tl.load(sin + table, mask=live, other=0.0) * tl.where((d & 1) == 0, -1.0, 1.0)  # (-im, re)
        for which in tl.static_range(2):  # q, then k
            w_ptr = qw if which == 0 else kw
            dst = q_out if which == 0 else k_out
            x = tl.load(rows + which * H * D + d, mask=live, other=0.0).to(tl.float32)
            x_pair = tl.load(rows + which * H * D + partner, mask=live, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
            y = x * rstd * tl.load(w_ptr + d).to(tl.float32)
            y_pair = x_pair * rstd * tl.load(w_ptr + partner).to(tl.float32)
            tl.store(dst + out_rows + d, (y * c + y_pair * s).to(dst.dtype.element_ty), mask=live)
        tl.store(v_out + out_rows + d, tl.load(rows + 2 * H * D + d, mask=live), mask=live)


@torch.library.custom_op("ditserve::norm_rope_qkv", mutates_args=())
def fused_norm_rope_qkv(qkvs: list[torch.Tensor], q_weights: list[torch.Tensor], k_weights: list[torch.Tensor],
                        cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, dh = qkvs[0].shape[0], cos.shape[-1]
    total = sum(t.shape[1] for t in qkvs)
    q, k, v = (torch.empty(b, total, heads, dh, device=qkvs[0].device, dtype=qkvs[0].dtype) for _ in range(3))
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    row0 = 0
    for qkv, qw, kw in zip(qkvs, q_weights, k_weights):
        if qkv.stride(-1) != 1:
            qkv = qkv.contiguous()
        seq = qkv.shape[1]
        grid = (triton.cdiv(seq, BLOCK_T), heads, b)
        _norm_rope_rows[grid](qkv, qkv.stride(0), qkv.stride(1), qw, kw, cos, sin, q, k, v,
                              seq, total, row0, eps, H=heads, D=dh, BLOCK_T=BLOCK_T, num_warps=NUM_WARPS)
        row0 += seq
    return q, k, v


@fused_norm_rope_qkv.register_fake
def _(qkvs, q_weights, k_weights, cos, sin, heads, eps):
    b, dh = qkvs[0].shape[0], cos.shape[-1]
    total = sum(t.shape[1] for t in qkvs)
    return tuple(qkvs[0].new_empty(b, total, heads, dh) for _ in range(3))


def triton_norm_rope_qkv(parts, rope, heads: int):
    """The block-level `qkv_op` (see norm_rope_qkv) running the fused kernel on CUDA tensors; other
    devices and head dims that are not a power of two take the reference."""
    qkvs = [qkv for qkv, _ in parts]
    norms = [norm for _, norm in parts]
    head_dim = rope.cos.shape[-1]
    if triton is None or head_dim & (head_dim - 1) or qkvs[0].device.type != "cuda":
        return norm_rope_qkv(parts, rope, heads)
    return fused_norm_rope_qkv(qkvs, [n.q_norm.weight for n in norms], [n.k_norm.weight for n in norms],
                               rope.cos, rope.sin, heads, norms[0].q_norm.eps)


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def apply_fused_qk_rope(dit: nn.Module, site: str) -> nn.Module:
    """Set the fused op on every block's QK-norm + RoPE slot `site` (from the model's plan)."""
    for block in dit.blocks:
        setattr(block, site, triton_norm_rope_qkv)
    log.info("fused QK-norm + RoPE on %d blocks", len(dit.blocks))
    return dit
