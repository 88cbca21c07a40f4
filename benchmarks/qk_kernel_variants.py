"""The QK-RMSNorm + RoPE kernel (accel/qk_rope.py) at several tiles on the GPU: time and error of
each against the reference op (eager and inductor-compiled), at FLUX.1-dev's stream shapes and the
demo model's. Times are per call inside a CUDA graph (kernel time, as in the step's replay); the
first results (2026-11-21) were timed from Python and carry ≈ 0.07 ms of launch overhead per call.

Why: with even and odd elements loaded apart (a rewrite of 2026-11-21) the FLUX step ran 24 ms
slower; this script found it (0.65 ms per call) and chose the whole-row + pair-partner load (0.14 ms,
results/qk_kernel_variants_h200.json, where "current" is the even/odd kernel and "swap" today's).
"pairs" is a candidate that loads each row once as [D/2, 2] and takes the partner within a thread.
Usage on the device machine: python3 benchmarks/qk_kernel_variants.py [OUT.json]
"""

from __future__ import annotations

import json
import sys

import torch
import triton
import triton.language as tl

from ditserve.accel import qk_rope
from ditserve.models.common.mmdit import QKNorm, norm_rope_qkv
from ditserve.models.common.rope import rope_tables


@triton.jit
def _pair_rows(src, batch_stride, row_stride, qw, kw, cos, sin, q_out, k_out, v_out, seq_part, seq_total, row0,
               eps, H: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr):
    """Candidate: rows loaded as [tokens, D/2, 2] (contiguous, one load), the pair partner taken by a
    sum over the axis of 2 (within a thread) instead of a second load."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    live = (t < seq_part)[:, None, None]
    e = tl.arange(0, 2)[None, None, :]
    d = 2 * tl.arange(0, D // 2)[None, :, None] + e
    rows = src + b * batch_stride + t[:, None, None].to(tl.int64) * row_stride + h * D
    out_rows = ((b * seq_total + row0 + t[:, None, None]) * H + h) * D
    table = (row0 + t[:, None, None]) * D + d
    c = tl.load(cos + table, mask=live, other=0.0)
    s = tl.load(sin + table, mask=live, other=0.0)
    for which in tl.static_range(2):
        w_ptr = qw if which == 0 else kw
        dst = q_out if which == 0 else k_out
        x = tl.load(rows + which * H * D + d, mask=live, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(x * x, axis=2), axis=1) / D + eps)[:, None, None]
        y = x * rstd * tl.load(w_ptr + d).to(tl.float32)
        y_even = tl.sum(tl.where(e == 0, y, 0.0), axis=2)[:, :, None]
        y_odd = tl.sum(tl.where(e == 1, y, 0.0), axis=2)[:, :, None]
        rotated = tl.where(e == 0, -y_odd, y_even)
        tl.store(dst + out_rows + d, (y * c + rotated * s).to(dst.dtype.element_ty), mask=live)
    tl.store(v_out + out_rows + d, tl.load(rows + 2 * H * D + d, mask=live), mask=live)


def tile(block_t, warps):
    def run(qkvs, qws, kws, cos, sin, heads, eps):
        qk_rope.BLOCK_T, qk_rope.NUM_WARPS = block_t, warps
        return qk_rope.fused_norm_rope_qkv(qkvs, qws, kws, cos, sin, heads, eps)
    return run


def pair_tile(block_t, warps):
    def run(qkvs, qws, kws, cos, sin, heads, eps):
        b, dh = qkvs[0].shape[0], cos.shape[-1]
        total = sum(t.shape[1] for t in qkvs)
        q, k, v = (torch.empty(b, total, heads, dh, device=qkvs[0].device, dtype=qkvs[0].dtype) for _ in range(3))
        row0 = 0
        for qkv, qw, kw in zip(qkvs, qws, kws):
            seq = qkv.shape[1]
            _pair_rows[(triton.cdiv(seq, block_t), heads, b)](qkv, qkv.stride(0), qkv.stride(1), qw, kw, cos, sin,
                                                              q, k, v, seq, total, row0, eps, H=heads, D=dh,
                                                              BLOCK_T=block_t, num_warps=warps)
            row0 += seq
        return q, k, v
    return run


def graph_time(fn, calls: int = 20, reps: int = 10) -> float:
    """Seconds per call with `calls` calls captured in one CUDA graph: kernel time, no launch cost."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / calls)
    return sorted(times)[reps // 2]


def case(b, t, n, heads, dh, single: bool, dtype):
    torch.manual_seed(0)
    norms = [QKNorm(dh).cuda().to(dtype) for _ in range(2)]
    for norm in norms:
        for p in norm.parameters():
            p.data.normal_()
    width = 7 if single else 3
    img = torch.randn(b, t + n if single else n, width * heads * dh, device="cuda", dtype=dtype)[..., : 3 * heads * dh]
    txt = torch.randn(b, t, 3 * heads * dh, device="cuda", dtype=dtype)
    axes = (dh // 8, 7 * dh // 16, 7 * dh // 16)
    cos, sin = rope_tables(torch.randint(0, 64, (t + n, 3), device="cuda").float(), axes, 10000.0)
    parts = [(img, norms[1])] if single else [(txt, norms[0]), (img, norms[1])]
    return parts, (cos, sin)


def main() -> int:
    out = sys.argv[1] if len(sys.argv) > 1 else "qk_variants.json"
    variants = {f"kernel T{bt} w{w}": tile(bt, w) for bt, w in ((8, 2), (16, 4), (32, 4), (64, 8))}
    variants.update({f"pairs T{bt} w{w}": pair_tile(bt, w) for bt, w in ((8, 2), (16, 4), (32, 4))})
    compiled_ref = torch.compile(norm_rope_qkv, fullgraph=True)
    rows = []
    shapes = {"flux double": (1, 512, 4096, 24, 128, False), "flux single": (1, 512, 4096, 24, 128, True),
              "demo": (4, 16, 64, 4, 32, False)}
    with torch.no_grad():
        for name, (b, t, n, heads, dh, single) in shapes.items():
            parts, pe = case(b, t, n, heads, dh, single, torch.float32)
            ref = norm_rope_qkv(parts, pe, heads)
            parts16, pe16 = case(b, t, n, heads, dh, single, torch.bfloat16)
            args16 = ([p for p, _ in parts16], [m.q_norm.weight for _, m in parts16],
                      [m.k_norm.weight for _, m in parts16], pe16[0], pe16[1], heads, 1e-6)
            timed = {"eager reference": lambda p=parts16, e=pe16, h=heads: norm_rope_qkv(p, e, h),
                     "compiled reference": lambda p=parts16, e=pe16, h=heads: compiled_ref(p, e, h)}
            for vname, fn in variants.items():
                got = fn([p for p, _ in parts], [m.q_norm.weight for _, m in parts],
                         [m.k_norm.weight for _, m in parts], pe[0], pe[1], heads, 1e-6)
                err = max(float((g - r).norm() / r.norm()) for g, r in zip(got, ref))
                timed[vname] = (lambda fn=fn, a=args16: fn(*a))
                rows.append({"shape": name, "variant": vname, "rel_l2_fp32": err})
            for vname, fn in timed.items():
                ms = graph_time(fn) * 1e3
                hit = next((r for r in rows if r["shape"] == name and r["variant"] == vname), None)
                if hit is None:
                    rows.append(hit := {"shape": name, "variant": vname})
                hit["ms_bf16"] = ms
    for r in rows:
        print(f"{r['shape']:12s} {r['variant']:20s} {r.get('ms_bf16', float('nan')):8.4f} ms  "
              f"rel {r.get('rel_l2_fp32', float('nan')):.1e}")
    with open(out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
