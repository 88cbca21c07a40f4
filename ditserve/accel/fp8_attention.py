"""8-bit attention for Hopper in Triton (SageAttention-style): forward, non-causal, no mask.

Same contract as `sdpa_attention`: q [B, Sq, H, D], k and v [B, Sk, H, D] -> [B, Sq, H, D] in q's
dtype, softmax scale 1/sqrt(D), D a power of two in 32..128.

Quantise (two Triton passes, after two torch reductions over tokens: the mean of k, the amax of v)
  q  one scale per token. The softmax scale · log2(e) is folded into it, so the kernel uses exp2.
  k  smoothed first: k - mean over tokens, per (batch, head, channel). Every logit of one query
     then moves by the same amount (q · mean), which softmax ignores, and the values left are
     smaller and centred. One scale per 128 tokens and head.
  v  one scale per (batch, head, channel), e4m3, written transposed as [B, H, D, Sk_pad]. Tokens
     are the reduction dim of P·V, and Hopper's 8-bit wgmma wants both operands K-major.
  q and k are int8 by default (as SageAttention does on Hopper) or e4m3 (`qk_int8=False`). On
  Gaussian data, e4m3's 3-bit mantissa gives about 3x the logit error of int8, and both run at the
  same tensor-core rate. Token counts are padded to a multiple of 128. The padding is written as
  zeros, so the attention kernel reads whole tiles without masks.
Attend (flash attention: grid (cdiv(Sq, BLOCK_M), B·H), the q tile loaded once)
  s  = (q8 · k8ᵀ) · sq · sk            int32 (exact) or fp32 accumulate, then one FMA per logit
  p' = 448 · 2^(s - m)  in [0, 448]    online softmax in fp32, then cast to e4m3
  acc = acc · 2^(m_old - m) + p'8 · v8 each key block's P·V goes into a fresh fp32 tile. Hopper's
                                       fp8 MMA accumulates with reduced precision, so it only ever
                                       sums the BLOCK_N products of one block.
  out = acc / l · sv                   l sums the fp32 p', so the 448 cancels
  The key tail (Sk not a multiple of BLOCK_N) is set to -inf in the last block only.
  `pv_fp8=False` keeps P·V in bf16 (v read as is): slower, with about a third of the error.

Accuracy. This is the relative L2 against fp32 attention on Gaussian q, k, v at FLUX's shape, from
a CPU emulation of this arithmetic. int8 q·k with e4m3 P·V: 3.9e-2. e4m3 / e4m3: 5.3e-2.
int8 / bf16: 1.2e-2. bf16 SDPA itself (bf16 P): ≈ 2e-3. For near-uniform attention, the e4m3 rounding
of P and of V alone costs ≈ 2.6e-2 each. The GPU timings and errors come from
benchmarks/bench_attention.py.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ditserve.models.common.attention import sdpa_attention

E4M3 = torch.float8_e4m3fn
PAD = 128  # tokens: the padding of the quantised tensors and k's scale block
LOG2_E = 1.4426950408889634


class KernelConfig(NamedTuple):
    """Launch parameters of the attention kernel (BLOCK_M, BLOCK_N: powers of two, 32..128)."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3
    tma: bool = False  # load q, k, v tiles through TMA descriptors (Hopper) instead of pointers


DEFAULT = KernelConfig()
# the candidates benchmarks/bench_attention.py sweeps
CONFIGS = [DEFAULT, KernelConfig(num_stages=2), KernelConfig(block_n=64), KernelConfig(block_n=64, num_warps=4),
           KernelConfig(block_m=64, num_warps=4), KernelConfig(tma=True), KernelConfig(block_n=64, tma=True),
           KernelConfig(num_stages=4, tma=True)]

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: sdpa_attention serves
    triton = None

if triton is not None:
    _PAD = tl.constexpr(PAD)
    _LOG2_448 = tl.constexpr(math.log2(448.0))  # p' = 448 · 2^(s - m) = 2^(s - m + log2 448)

    @triton.jit
    def _round8(x, INT8: tl.constexpr):
        """x, already scaled into [-127, 127] (int8: round to nearest) or [-448, 448] (e4m3)."""
        if INT8:
            return tl.where(x >= 0, x + 0.5, x - 0.5).to(tl.int8)
        else:
            return x.to(tl.float8e4nv)

    @triton.jit
    def _quantize_q(q, q8, q_scale, S, S_pad, H, stride_b, stride_s, stride_h, scale_log2,
                    D: tl.constexpr, BLOCK: tl.constexpr, INT8: tl.constexpr):
        """Grid (S_pad / BLOCK, B·H): BLOCK tokens of one head, one scale per token."""
        t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        bh = tl.program_id(1).to(tl.int64)
        d = tl.arange(0, D)[None, :]
        live = (t < S)[:, None]
        src = (bh // H) * stride_b + t[:, None].to(tl.int64) * stride_s + (bh % H) * stride_h + d
        x = tl.load(q + src, mask=live, other=0.0).to(tl.float32)
        qmax = 127.0 if INT8 else 448.0
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12)
        tl.store(q8 + (bh * S_pad + t[:, None]) * D + d, _round8(x * (qmax / amax)[:, None], INT8))
        tl.store(q_scale + bh * S_pad + t, amax * (scale_log2 / qmax))

    @triton.jit
    def _quantize_kv(k, v, k_mean, v_amax, k8, k_scale, vt8, S, S_pad, H, stride_b, stride_s, stride_h,
                     D: tl.constexpr, BLOCK: tl.constexpr, INT8: tl.constexpr, PV_FP8: tl.constexpr):
        """Grid (S_pad / BLOCK, B·H): BLOCK tokens of one head. k: smoothed, one scale for the
        block; v: e4m3 with its per-channel scale, stored transposed. Padding rows become 0."""
        blk = tl.program_id(0)
        t = blk * BLOCK + tl.arange(0, BLOCK)
        bh = tl.program_id(1).to(tl.int64)
        d = tl.arange(0, D)[None, :]
        live = (t < S)[:, None]
        src = (bh // H) * stride_b + t[:, None].to(tl.int64) * stride_s + (bh % H) * stride_h + d
        x = tl.load(k + src, mask=live, other=0.0).to(tl.float32) - tl.load(k_mean + bh * D + d)
        x = tl.where(live, x, 0.0)
        qmax = 127.0 if INT8 else 448.0
        amax = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 1e-12)
        tl.store(k8 + (bh * S_pad + t[:, None]) * D + d, _round8(x * (qmax / amax), INT8))
        tl.store(k_scale + bh * (S_pad // BLOCK) + blk, amax / qmax)
        if PV_FP8:
            x = tl.load(v + src, mask=live, other=0.0).to(tl.float32) * (448.0 / tl.load(v_amax + bh * D + d))
            tl.store(vt8 + (bh * D + d) * S_pad + t[:, None], x.to(tl.float8e4nv))

    @triton.jit
    def _tile(src, row, col, stride, R: tl.constexpr, C: tl.constexpr, TMA: tl.constexpr):
        """The [R, C] tile at (row, col) of a row-major 2-D 8-bit buffer (TMA descriptor or pointer)."""
        if TMA:
            return src.load([row, col])
        else:
            r = (row + tl.arange(0, R)).to(tl.int64)
            return tl.load(src + r[:, None] * stride + col + tl.arange(0, C)[None, :])

    @triton.jit
    def _key_block(acc, l_i, m_i, q, q_scale, k8, k_scale, v, start_n, bh, S, S_pad, stride_vs,
                   D: tl.constexpr, BLOCK_N: tl.constexpr, PV_FP8: tl.constexpr, TMA: tl.constexpr,
                   MASK: tl.constexpr):
        """One key block of the online softmax: returns the updated (acc, l, m)."""
        k = _tile(k8, bh * S_pad + start_n, 0, D, BLOCK_N, D, TMA)
        s = tl.dot(q, tl.trans(k)).to(tl.float32)  # int32 for int8 operands: exact
        c = q_scale * tl.load(k_scale + bh * (S_pad // _PAD) + start_n // _PAD)  # [BLOCK_M], > 0
        n = start_n + tl.arange(0, BLOCK_N)
        if MASK:
            s = tl.where((n < S)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * c)
        p = tl.math.exp2(s * c[:, None] - (m_new - _LOG2_448)[:, None])  # in [0, 448]
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if PV_FP8:
            vt = _tile(v, bh * D, start_n, S_pad, D, BLOCK_N, TMA)  # [D, BLOCK_N], tokens contiguous
            pv = tl.dot(p.to(tl.float8e4nv), tl.trans(vt))
        else:  # v as given: [B, Sk, H, D], `v` already points at this (batch, head)
            rows = v + n[:, None].to(tl.int64) * stride_vs + tl.arange(0, D)[None, :]
            vb = tl.load(rows, mask=(n < S)[:, None], other=0.0) if MASK else tl.load(rows)
            pv = tl.dot(p.to(vb.dtype), vb)
        return acc * alpha[:, None] + pv, l_i, m_new

    @triton.jit
    def _attention(q8, q_scale, k8, k_scale, v, v_scale, out, Sq, Sq_pad, Sk, Sk_pad, H,
                   stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PV_FP8: tl.constexpr, TMA: tl.constexpr):
        """Grid (cdiv(Sq, BLOCK_M), B·H): BLOCK_M queries of one head against all keys."""
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1)
        b, h = (bh // H).to(tl.int64), bh % H
        rows = start_m + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        q = _tile(q8, bh * Sq_pad + start_m, 0, D, BLOCK_M, D, TMA)
        qs = tl.load(q_scale + bh * Sq_pad + rows)
        if not PV_FP8:
            v += b * stride_vb + h * stride_vh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        n_full = Sk // BLOCK_N * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            acc, l_i, m_i = _key_block(acc, l_i, m_i, q, qs, k8, k_scale, v, start_n, bh, Sk, Sk_pad,
                                       stride_vs, D, BLOCK_N, PV_FP8, TMA, False)
        if n_full < Sk:
            acc, l_i, m_i = _key_block(acc, l_i, m_i, q, qs, k8, k_scale, v, n_full, bh, Sk, Sk_pad,
                                       stride_vs, D, BLOCK_N, PV_FP8, TMA, True)
        o = acc * (1.0 / l_i)[:, None]
        if PV_FP8:
            o = o * tl.load(v_scale + bh * D + d)[None, :]
        dst = out + b * stride_ob + rows[:, None].to(tl.int64) * stride_os + h * stride_oh + d[None, :]
        tl.store(dst, o.to(out.dtype.element_ty), mask=(rows < Sq)[:, None])


class Quantized(NamedTuple):
    """What the attention kernel reads: 8-bit tensors padded to a multiple of PAD tokens, and scales."""

    q8: torch.Tensor  # [B, H, Sq_pad, D] int8 or e4m3
    q_scale: torch.Tensor  # [B, H, Sq_pad] float32, includes softmax scale · log2(e)
    k8: torch.Tensor  # [B, H, Sk_pad, D] int8 or e4m3, of k - k_mean
    k_scale: torch.Tensor  # [B, H, Sk_pad / PAD] float32
    k_mean: torch.Tensor  # [B, H, D] float32
    vt8: torch.Tensor  # [B, H, D, Sk_pad] e4m3 (empty when P·V runs in bf16)
    v_scale: torch.Tensor  # [B, H, D] float32


def _padded(s: int) -> int:
    return -(-s // PAD) * PAD


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_int8: bool = True,
             pv_fp8: bool = True) -> Quantized:
    """The 8-bit operands of the attention kernel (see the module docstring)."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    dev, qk_dtype = q.device, torch.int8 if qk_int8 else E4M3
    sq_pad, sk_pad = _padded(sq), _padded(sk)
    k_mean = k.mean(dim=1, dtype=torch.float32)  # [B, H, D]
    if pv_fp8:
        v_min, v_max = torch.aminmax(v, dim=1)  # one pass, no |v| temporary
        v_amax = torch.maximum(-v_min, v_max).float().clamp(min=1e-12)
        vt8 = torch.empty(b, h, d, sk_pad, device=dev, dtype=E4M3)
    else:
        v_amax, vt8 = torch.full((b, h, d), 448.0, device=dev), torch.empty(0, device=dev, dtype=E4M3)
    q8 = torch.empty(b, h, sq_pad, d, device=dev, dtype=qk_dtype)
    q_scale = torch.empty(b, h, sq_pad, device=dev, dtype=torch.float32)
    k8 = torch.empty(b, h, sk_pad, d, device=dev, dtype=qk_dtype)
    k_scale = torch.empty(b, h, sk_pad // PAD, device=dev, dtype=torch.float32)
    _quantize_q[(sq_pad // 64, b * h)](q, q8, q_scale, sq, sq_pad, h, q.stride(0), q.stride(1), q.stride(2),
                                        LOG2_E / math.sqrt(d), D=d, BLOCK=64, INT8=qk_int8, num_warps=4)
    _quantize_kv[(sk_pad // PAD, b * h)](k, v, k_mean, v_amax, k8, k_scale, vt8, sk, sk_pad, h,
                                         k.stride(0), k.stride(1), k.stride(2), D=d, BLOCK=PAD,
                                         INT8=qk_int8, PV_FP8=pv_fp8, num_warps=8)
    return Quantized(q8, q_scale, k8, k_scale, k_mean, vt8, v_amax / 448.0)


def _operands(x: Quantized, cfg: KernelConfig, pv_fp8: bool):
    """The q, k, v tile sources for the kernel: the tensors, or TMA descriptors over their 2-D views."""
    d = x.q8.shape[-1]
    if not cfg.tma:
        return x.q8, x.k8, x.vt8
    from triton.tools.tensor_descriptor import TensorDescriptor

    q = TensorDescriptor.from_tensor(x.q8.view(-1, d), [cfg.block_m, d])
    k = TensorDescriptor.from_tensor(x.k8.view(-1, d), [cfg.block_n, d])
    vt = TensorDescriptor.from_tensor(x.vt8.view(-1, x.vt8.shape[-1]), [d, cfg.block_n]) if pv_fp8 else x.vt8
    return q, k, vt


def attend(x: Quantized, v: torch.Tensor, sq: int, sk: int, out_dtype: torch.dtype,
           cfg: KernelConfig = DEFAULT, pv_fp8: bool = True) -> torch.Tensor:
    """The attention kernel alone on quantised operands; `v` (the original) is read only when
    P·V runs in bf16. Returns [B, Sq, H, D]."""
    b, h, sq_pad, d = x.q8.shape
    if cfg.block_m > PAD or cfg.block_n > PAD or min(cfg.block_m, cfg.block_n) < 32:
        raise ValueError(f"block sizes must be powers of two in 32..{PAD}: {cfg}")
    if v.stride(-1) != 1:
        v = v.contiguous()
    out = torch.empty(b, sq, h, d, device=x.q8.device, dtype=out_dtype)
    q_src, k_src, v_src = _operands(x, cfg, pv_fp8)
    if not pv_fp8:
        v_src = v
    grid = (triton.cdiv(sq, cfg.block_m), b * h)
    _attention[grid](q_src, x.q_scale, k_src, x.k_scale, v_src, x.v_scale, out, sq, sq_pad, sk,
                     x.k8.shape[2], h, v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
                     out.stride(2), D=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PV_FP8=pv_fp8,
                     TMA=cfg.tma, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


@torch.library.custom_op("ditserve::fp8_attention", mutates_args=())
def fp8_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_int8: bool = True,
                     pv_fp8: bool = True, block_m: int = 128, block_n: int = 128, num_warps: int = 8,
                     num_stages: int = 3, tma: bool = False) -> torch.Tensor:
    """Quantise and attend: two reductions and three Triton launches, no host sync."""
    cfg = KernelConfig(block_m, block_n, num_warps, num_stages, tma)
    return attend(quantize(q, k, v, qk_int8, pv_fp8), v, q.shape[1], k.shape[1], q.dtype, cfg, pv_fp8)


@fp8_attention_op.register_fake
def _(q, k, v, qk_int8=True, pv_fp8=True, block_m=128, block_n=128, num_warps=8, num_stages=3, tma=False):
    return q.new_empty(q.shape)  # contiguous, as attend's output


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel serves these tensors: CUDA, Triton installed, one head dim (a power of
    two, 32..128) and head count for q, k and v, and k and v of the same length."""
    d = q.shape[-1]
    return (triton is not None and q.device.type == "cuda" and d in (32, 64, 128)
            and k.shape == v.shape and q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:])


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """The attention op of the "fp8" backend. A key mask, a CPU tensor or a missing Triton sends
    the call to sdpa_attention."""
    if mask is not None or not supported(q, k, v):
        return sdpa_attention(q, k, v, mask=mask)
    return fp8_attention_op(q, k, v)
