"""The QK-RMSNorm + RoPE kernel (accel/qk_rope.py) at several tiles on the GPU: time and error of
each against the reference op (eager and inductor-compiled), at FLUX.1-dev's stream shapes and the
demo model's. Times are per call from Python, so they include ≈ 0.07 ms of launch overhead.

Why: with even and odd elements loaded apart (a rewrite of 2026-11-21) the FLUX step ran 24 ms
slower; this script found it (0.65 ms per call) and chose the whole-row + pair-partner load (0.14 ms,
results/qk_kernel_variants_h200.json, where "current" is the even/odd kernel and "swap" today's).
Usage on the device machine: python3 benchmarks/qk_kernel_variants.py [OUT.json]
"""

from __future__ import annotations

import json
import sys

import torch

from ditserve.accel import qk_rope
from ditserve.bench.common import median_time
from ditserve.models.common.mmdit import QKNorm, norm_rope_qkv
from ditserve.models.common.rope import rope_tables


def tile(block_t, warps):
    def run(qkvs, qws, kws, cos, sin, heads, eps):
        qk_rope.BLOCK_T, qk_rope.NUM_WARPS = block_t, warps
        return qk_rope.fused_norm_rope_qkv(qkvs, qws, kws, cos, sin, heads, eps)
    return run


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
                ms = median_time(fn, warmup=5, reps=50) * 1e3
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
