"""8-bit attention (backend "fp8"): cuDNN's fp8 SDPA graph fed by our own quantisation kernels.

Numerics (chosen by benchmarks/attention8_numerics.py; its JSON in benchmarks/results/):
- q, k, v in e4m3 with one power-of-two scale per tensor (cuDNN takes per-tensor descale scalars;
  e4m3 is floating point, so finer scales buy little, and a power of two scales exactly);
- K smoothing: k minus its mean over tokens, per (batch, head). Softmax is unchanged (a constant
  per query row), and the shared component real models carry in k no longer costs fp8 precision;
- V smoothing: v minus its mean over tokens, added back after attention in fp32. Exact because each
  row of P sums to one; it takes the mean out of the fp8 V and, above all, out of the fp8 output
  (cuDNN writes O in e4m3 on Hopper: alone the largest error for diffuse attention);
- P in e4m3 times 448 (P is in [0, 1]), O in e4m3 with v's scale (rows of O are convex
  combinations of v's rows, so it cannot overflow), or bf16 where cuDNN builds that graph.

Scales need no host sync: a stats kernel writes per-program amax and column-sum partials, the
quantise kernel reduces them itself (the smoothed tensors' bound is 2·amax, harmless headroom in
e4m3) and writes fp8 q, k, v plus the means and scales the epilogue uses. Three passes over
[B, S, H, D] bf16 tensors read-dominated: small beside the attention they feed at DiT lengths.

On CPU (and in tests) `attention_reference` emulates the same numerics in float32 torch, and the
kernels run in Triton's interpreter with a bit-exact integer e4m3 rounding (the interpreter's own
fp8 cast mis-rounds); on CUDA they use the native cast (tests/gpu checks both agree).
"""

from __future__ import annotations

import logging
import math

import torch

from ditserve.models.common.attention import sdpa_attention

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK_T = 32  # tokens per inner step of the quantisation kernels
TARGET_PROGRAMS = 512  # programs per tensor (≈ 4 per H200 SM); bounds the partial buffers too
P_SCALE = 448.0  # P in [0, 1] -> e4m3 at full range
PART_BLOCK = 1024  # amax partials reduced per step in the quantise kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the emulation serves
    triton = None


# ---------------------------------------------------------------- torch reference (emulation)

def pow2_scale(bound: torch.Tensor) -> torch.Tensor:
    """The largest power of two s with bound·s <= 448, computed exactly from the float's bits
    (the kernel does the same integer arithmetic); exponent clamped to ±100 (bound 0 included)."""
    bits = bound.float().reshape(1).view(torch.int32)
    exp = ((bits >> 23) & 0xFF) - 127
    e = torch.where((bits & 0x7FFFFF) <= 0x600000, 8 - exp, 7 - exp).clamp(-100, 100)
    return ((e + 127) << 23).view(torch.float32).reshape(())


def quantize_reference(x: torch.Tensor, smooth: bool, mean: torch.Tensor | None = None):
    """x [B, S, H, D] -> (e4m3 [B, S, H, D], scale (0-d float32), mean [B, H, D] float32 or None).

    Scale from amax over the whole tensor (2·amax when smoothed: |x - mean| <= 2·amax); `mean`
    may be passed in (tests hand over the kernel's, whose summation order differs)."""
    xf = x.float()
    amax = xf.abs().amax()
    if smooth:
        if mean is None:
            mean = xf.sum(dim=1) * _inv(x.shape[1])
        xf = xf - mean[:, None]
        amax = amax * 2.0
    scale = pow2_scale(amax)
    return (xf * scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale, mean


def _inv(n: int) -> torch.Tensor:
    return torch.tensor(1.0 / n, dtype=torch.float32)


def _e4m3_round(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float()


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp8_out: bool = True,
                        chunk: int = 1024) -> torch.Tensor:
    """The backend's numerics in float32 torch (any device): quantised q, k, v as the kernels
    write them, fp32 scores, e4m3 P (x448), row sums from fp32 P, e4m3 O with v's scale when
    `fp8_out` (cuDNN on Hopper), v's mean added back. Returns q's dtype, [B, S, H, D]."""
    q8, sq, _ = quantize_reference(q, smooth=False)
    k8, sk, _ = quantize_reference(k, smooth=True)
    v8, sv, mean_v = quantize_reference(v, smooth=True)
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q8, k8, v8))  # [B, H, S, D] in scaled units
    score_scale = (1.0 / (sq * sk)) / math.sqrt(q.shape[-1])
    out = torch.empty(qf.shape[:3] + (vf.shape[-1],), dtype=torch.float32, device=q.device)
    for i in range(0, qf.shape[2], chunk):  # bounded memory: query rows in chunks
        s = (qf[:, :, i:i + chunk] @ kf.transpose(-1, -2)) * score_scale
        p = torch.exp(s - s.amax(dim=-1, keepdim=True))
        p8 = _e4m3_round(p * P_SCALE)
        o = (p8 @ vf) / (p.sum(dim=-1, keepdim=True) * P_SCALE)  # still in v's scaled units
        out[:, :, i:i + chunk] = _e4m3_round(o) if fp8_out else o
    out = out / sv + mean_v[:, :, None]
    return out.transpose(1, 2).to(q.dtype)


# ---------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _e4m3_bits(x, NATIVE: tl.constexpr):
        """fp32 (|x| <= 448) -> e4m3fn bit patterns as uint8, round to nearest even."""
        if NATIVE:
            return x.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        bits = x.to(tl.int32, bitcast=True)
        sign = ((bits >> 31) & 1) << 7
        mag = bits & 0x7FFFFFFF
        a = mag.to(tl.float32, bitcast=True)
        # below 2^-6: multiples of 2^-9, whose count is the code itself (8 -> 2^-6, exp field 1)
        sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
        # normal: round the 23-bit mantissa to 3 bits (carries into the exponent), rebias 127 -> 7
        nrm = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - 960
        return (tl.where(a < 0.015625, sub, nrm) | sign).to(tl.uint8)

    @triton.jit
    def _e4m3_value(c, NATIVE: tl.constexpr):
        """e4m3fn bit patterns (uint8) -> fp32."""
        if NATIVE:
            return c.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        c = c.to(tl.int32)
        e = (c >> 3) & 0xF
        m = (c & 7).to(tl.float32)
        mag = tl.where(e == 0, m * 0.001953125, (m + 8.0) * tl.exp2((e - 10).to(tl.float32)))
        return tl.where((c & 0x80) != 0, -mag, mag)

    @triton.jit
    def _stats_kernel(x, sb, ss, sh, seq, per_prog, amax_part, sum_part,
                      H: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, WITH_SUM: tl.constexpr):
        """Grid (token ranges, heads, batch): amax and (optionally) per-channel sums of one range
        of one head, written at part index (b·H + h)·n_t + t."""
        t, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        part = (b * H + h) * tl.num_programs(0) + t
        d = tl.arange(0, D)[None, :]
        amax = tl.zeros([BLOCK_T], dtype=tl.float32)
        acc = tl.zeros([D], dtype=tl.float32)
        for i in range(0, per_prog, BLOCK_T):
            tok = t * per_prog + i + tl.arange(0, BLOCK_T)
            live = (tok < seq)[:, None]
            ptr = x + b.to(tl.int64) * sb + tok[:, None].to(tl.int64) * ss + h * sh + d
            val = tl.load(ptr, mask=live, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(val), axis=1))
            if WITH_SUM:
                acc += tl.sum(val, axis=0)
        tl.store(amax_part + part, tl.max(amax, axis=0))
        if WITH_SUM:
            tl.store(sum_part + part * D + tl.arange(0, D), acc)

    @triton.jit
    def _quant_kernel(x, sb, ss, sh, seq, per_prog, amax_part, n_part, sum_part, inv_seq,
                      out, mean_out, scale_out,
                      H: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, PART_BLOCK: tl.constexpr,
                      SMOOTH: tl.constexpr, NATIVE: tl.constexpr):
        """Grid as the stats kernel's: reduce the amax partials to the tensor's power-of-two scale,
        the (b, h) sums to its mean, and write e4m3((x - mean)·scale) as contiguous [B, S, H, D]
        bytes; program (0, 0, 0) writes the scale's reciprocal, t = 0 the mean."""
        t, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_t = tl.num_programs(0)
        amax = tl.zeros([PART_BLOCK], dtype=tl.float32)
        for i in range(0, n_part, PART_BLOCK):
            offs = i + tl.arange(0, PART_BLOCK)
            amax = tl.maximum(amax, tl.load(amax_part + offs, mask=offs < n_part, other=0.0))
        bound = tl.max(amax, axis=0)
        if SMOOTH:
            bound = bound * 2.0
        bits = bound.to(tl.int32, bitcast=True)
        exp = ((bits >> 23) & 0xFF) - 127
        e = tl.where((bits & 0x7FFFFF) <= 0x600000, 8 - exp, 7 - exp)
        e = tl.minimum(tl.maximum(e, -100), 100)
        scale = ((e + 127) << 23).to(tl.float32, bitcast=True)
        if (t == 0) & (h == 0) & (b == 0):
            tl.store(scale_out, ((127 - e) << 23).to(tl.float32, bitcast=True))
        dd = tl.arange(0, D)
        mean = tl.zeros([D], dtype=tl.float32)
        if SMOOTH:
            row0 = (b * H + h) * n_t
            for j in range(n_t):  # fixed order: every program gets the same mean
                mean += tl.load(sum_part + (row0 + j) * D + dd)
            mean = mean * inv_seq
            if t == 0:
                tl.store(mean_out + (b * H + h) * D + dd, mean)
        for i in range(0, per_prog, BLOCK_T):
            tok = t * per_prog + i + tl.arange(0, BLOCK_T)
            live = (tok < seq)[:, None]
            ptr = x + b.to(tl.int64) * sb + tok[:, None].to(tl.int64) * ss + h * sh + dd[None, :]
            val = tl.load(ptr, mask=live, other=0.0).to(tl.float32)
            val = (val - mean[None, :]) * scale
            val = tl.minimum(tl.maximum(val, -448.0), 448.0)
            dst = out + ((b.to(tl.int64) * seq + tok[:, None]) * H + h) * D + dd[None, :]
            tl.store(dst, _e4m3_bits(val, NATIVE), mask=live)

    @triton.jit
    def _epilogue_kernel(o, descale, mean, out, seq, H: tl.constexpr, D: tl.constexpr,
                         BLOCK_T: tl.constexpr, FP8_IN: tl.constexpr, NATIVE: tl.constexpr):
        """Grid (token blocks, heads, batch): out = o·descale + mean[b, h] (contiguous [B, S, H, D]);
        o is e4m3 bytes (FP8_IN) or already real-valued (descale unused)."""
        t, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        tok = t * BLOCK_T + tl.arange(0, BLOCK_T)
        live = (tok < seq)[:, None]
        dd = tl.arange(0, D)
        offs = ((b.to(tl.int64) * seq + tok[:, None]) * H + h) * D + dd[None, :]
        raw = tl.load(o + offs, mask=live, other=0)
        if FP8_IN:
            val = _e4m3_value(raw, NATIVE) * tl.load(descale)
        else:
            val = raw.to(tl.float32)
        val += tl.load(mean + (b * H + h) * D + dd)[None, :]
        tl.store(out + offs, val.to(out.dtype.element_ty), mask=live)


def _split(b: int, s: int, h: int) -> tuple[int, int]:
    """(tokens per program, programs along tokens) for a [B, S, H, D] tensor."""
    chunks = triton.cdiv(s, BLOCK_T)
    per_prog = BLOCK_T * triton.cdiv(chunks, max(1, TARGET_PROGRAMS // (b * h)))
    return per_prog, triton.cdiv(s, per_prog)


def quantize_fp8(x: torch.Tensor, smooth: bool):
    """Triton: x [B, S, H, D] (last dim contiguous, D a power of two) -> (e4m3 [B, S, H, D]
    contiguous, descale [1, 1, 1, 1] float32 = 1/scale, mean [B, H, D] float32 or None). No host
    sync: the scale and mean stay on the device."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, s, h, d = x.shape
    per_prog, n_t = _split(b, s, h)
    n_part = b * h * n_t
    dev = x.device
    amax_part = torch.empty(n_part, device=dev, dtype=torch.float32)
    sum_part = torch.empty(n_part * d if smooth else 1, device=dev, dtype=torch.float32)
    grid = (n_t, h, b)
    _stats_kernel[grid](x, x.stride(0), x.stride(1), x.stride(2), s, per_prog, amax_part, sum_part,
                        H=h, D=d, BLOCK_T=BLOCK_T, WITH_SUM=smooth)
    out = torch.empty(b, s, h, d, device=dev, dtype=E4M3)
    mean = torch.empty(b, h, d, device=dev, dtype=torch.float32) if smooth else sum_part
    descale = torch.empty(1, 1, 1, 1, device=dev, dtype=torch.float32)
    _quant_kernel[grid](x, x.stride(0), x.stride(1), x.stride(2), s, per_prog, amax_part, n_part, sum_part,
                        1.0 / s, out.view(torch.uint8), mean, descale, H=h, D=d, BLOCK_T=BLOCK_T,
                        PART_BLOCK=PART_BLOCK, SMOOTH=smooth, NATIVE=dev.type == "cuda")
    return out, descale, (mean if smooth else None)


def dequantize_out(o: torch.Tensor, descale: torch.Tensor, mean: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Triton epilogue: o [B, S, H, D] (e4m3, or bf16 already dequantised) -> o·descale + mean."""
    b, s, h, d = o.shape
    out = torch.empty(b, s, h, d, device=o.device, dtype=dtype)
    fp8_in = o.dtype == E4M3
    _epilogue_kernel[(triton.cdiv(s, BLOCK_T), h, b)](o.view(torch.uint8) if fp8_in else o, descale, mean, out, s,
                                                       H=h, D=d, BLOCK_T=BLOCK_T, FP8_IN=fp8_in,
                                                       NATIVE=o.device.type == "cuda")
    return out


# ---------------------------------------------------------------- cuDNN graph (CUDA only)

class _CudnnFp8Sdpa:
    """One cuDNN fp8 SDPA graph for q [B, Sq, H, D], k, v [B, Skv, H, D] (e4m3, BSHD strides). Tries a
    bf16 output first, then e4m3 (what Hopper builds in the cuDNN versions measured so far)."""

    def __init__(self, b: int, sq: int, skv: int, h: int, d: int, device: torch.device):
        self.fp8_out = True
        err = None
        for fp8_out in (False, True):
            try:
                self._build(b, sq, skv, h, d, fp8_out)
                self.fp8_out = fp8_out
                break
            except Exception as exc:  # noqa: BLE001 - cuDNN refuses unsupported graphs by raising
                err = exc
        else:
            raise RuntimeError(f"cuDNN fp8 SDPA graph not supported for {(b, sq, skv, h, d)}: {err}")
        self.workspace = torch.empty(self.graph.get_workspace_size(), device=device, dtype=torch.uint8)
        one = torch.ones(1, 1, 1, 1, device=device)
        self.p_scale, self.p_descale, self.one = one * P_SCALE, one / P_SCALE, one
        self.amax = [torch.empty(1, 1, 1, 1, device=device) for _ in range(2)]
        log.info("cuDNN fp8 SDPA graph for %s: %s output", (b, sq, skv, h, d), "e4m3" if self.fp8_out else "bf16")

    def _build(self, b, sq, skv, h, d, fp8_out):
        import cudnn

        self.handle = cudnn.create_handle()
        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32,
                              handle=self.handle)

        def bshd(name, s):
            return graph.tensor(name=name, dim=[b, h, s, d], stride=[s * h * d, d, h * d, 1], data_type=e4m3)

        self.q, self.k, self.v = bshd("q", sq), bshd("k", skv), bshd("v", skv)
        scalar = {"dim": [1, 1, 1, 1], "stride": [1, 1, 1, 1], "data_type": fp32}
        self.scales = [graph.tensor(name=n, **scalar) for n in ("dq", "dk", "dv", "ds", "ss", "so")]
        kwargs = dict(zip(("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"), self.scales),
                      attn_scale=1.0 / math.sqrt(d), use_causal_mask=False, name="sdpa_fp8")
        try:
            outs = graph.sdpa_fp8(q=self.q, k=self.k, v=self.v, generate_stats=False, **kwargs)
        except TypeError:  # older frontends: is_inference instead of generate_stats
            outs = graph.sdpa_fp8(q=self.q, k=self.k, v=self.v, is_inference=True, **kwargs)
        self.o, _, self.amax_s, self.amax_o = outs
        o_type = e4m3 if fp8_out else cudnn.data_type.BFLOAT16
        self.o.set_output(True).set_dim([b, h, sq, d]).set_stride([sq * h * d, d, h * d, 1]).set_data_type(o_type)
        for amax in (self.amax_s, self.amax_o):
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph = graph

    def __call__(self, q8, k8, v8, dq, dk, dv, so) -> torch.Tensor:
        """e4m3 in; out: e4m3 O·so (fp8 graph) or bf16 O·so. Runs on the current stream (capturable)."""
        import cudnn

        b, sq, h, d = q8.shape
        out = torch.empty(b, sq, h, d, device=q8.device, dtype=E4M3 if self.fp8_out else torch.bfloat16)
        cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
        pack = {self.q: q8, self.k: k8, self.v: v8, self.o: out, self.amax_s: self.amax[0], self.amax_o: self.amax[1]}
        pack.update(zip(self.scales, (dq, dk, dv, self.p_descale, self.p_scale, so)))
        self.graph.execute(pack, self.workspace, handle=self.handle)
        return out


_GRAPHS: dict[tuple, _CudnnFp8Sdpa] = {}


def _graph_for(q: torch.Tensor, k: torch.Tensor) -> _CudnnFp8Sdpa:
    key = (q.shape[0], q.shape[1], k.shape[1], q.shape[2], q.shape[3], q.device.index)
    if key not in _GRAPHS:
        _GRAPHS[key] = _CudnnFp8Sdpa(*key[:5], q.device)
    return _GRAPHS[key]


@torch.library.custom_op("ditserve::fp8_attention", mutates_args=())
def fp8_attention_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v [B, S, H, D] bf16/fp16 on a Hopper GPU -> [B, S, H, D] in q's dtype."""
    q8, dq, _ = quantize_fp8(q, smooth=False)
    k8, dk, _ = quantize_fp8(k, smooth=True)
    v8, dv, mean_v = quantize_fp8(v, smooth=True)
    graph = _graph_for(q, k)
    so = 1.0 / dv if graph.fp8_out else graph.one  # v's scale: |O - mean| <= bound, no overflow
    return dequantize_out(graph(q8, k8, v8, dq, dk, dv, so), dv, mean_v, q.dtype)


@fp8_attention_cuda.register_fake
def _(q, k, v):
    return torch.empty_like(q)


def takes_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Calls the fp8 op hands to SDPA: padded keys (a mask), or head dims cuDNN/our kernels lack."""
    d = q.shape[-1]
    return mask is not None or bool(d & (d - 1)) or d > 256 or k.shape[-1] != d or v.shape[-1] != d


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The "fp8" attention op (see the module docstring). Padded keys (a mask) take SDPA."""
    if takes_sdpa(q, k, v, mask):
        return sdpa_attention(q, k, v, mask=mask)
    return fp8_attention_cuda(q, k, v)


def fp8_attention_emulated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """The same numerics in float32 torch, with the same SDPA fallbacks, for CPU quality checks
    (slow; not a speed path)."""
    if takes_sdpa(q, k, v, mask):
        return sdpa_attention(q, k, v, mask=mask)
    return attention_reference(q, k, v)


def unsupported_reason(device: torch.device) -> str | None:
    """Why the fp8 backend cannot run on `device` (None: it can)."""
    import importlib.util

    if device.type != "cuda":
        return "needs a CUDA GPU"
    if triton is None:
        return "needs triton"
    if importlib.util.find_spec("cudnn") is None:
        return "needs nvidia-cudnn-frontend (pip package; import name cudnn)"
    if torch.cuda.get_device_capability(device) < (9, 0):
        return "needs a Hopper or newer GPU (cuDNN fp8 SDPA)"
    return None
