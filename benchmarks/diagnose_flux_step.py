"""Where the FLUX.1-dev step's time goes on the GPU: kernels inside the CUDA-graph replay, gaps
between them, SM clocks while replaying, and the GEMM / attention shapes on their own.

Writes $OUT/diagnose.json and kernel tables; prints a short summary last. No diffusers needed:
our DiT is built with random weights directly (speed does not depend on weight values).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections import defaultdict
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from ditserve.accel import accelerate_dit
from ditserve.bench.common import arch_kwargs, architectures, median_time
from ditserve.bench.flux import inputs
from ditserve.config import AccelConfig
from ditserve.models.flux.config import FluxConfig
from ditserve.models.flux.model import FluxDiT

log = logging.getLogger("diagnose")


def category(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("fmha", "cudnn", "flash", "attn", "sdpa")) and "triton" not in n:
        return "attention"
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "sm90_xmma", "gemv", "splitk")):
        return "gemm"
    if "triton" in n:
        return "triton"
    if "memcpy" in n or "copy" in n:
        return "copy"
    return "other"


def random_dit(device: str, dtype: torch.dtype, scale: float = 0.5) -> FluxDiT:
    cfg = FluxConfig.from_dict(arch_kwargs(architectures()["flux.1-dev"]["transformer"]))
    torch.manual_seed(0)
    with torch.device(device):
        dit = FluxDiT(cfg).to(dtype)
    with torch.no_grad():
        for p in dit.parameters():
            p.mul_(scale)
    return dit.eval().requires_grad_(False)


def trace_kernels(fn, path: str, cpu: bool = False) -> list[dict]:
    """The GPU kernels of one call of `fn` (after one untraced call), by start time; with `cpu`, the
    profiler's CPU ops instead (nested: aten::linear holds aten::addmm)."""
    sync = (lambda: None) if cpu else torch.cuda.synchronize
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CPU if cpu else ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    kind = "cpu_op" if cpu else "kernel"
    return sorted((e for e in events if e.get("cat") == kind), key=lambda e: e["ts"])


def summarise(kernels: list[dict], out: str, tag: str, categorise=category) -> dict:
    by_cat, by_name = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for k in kernels:
        by_cat[categorise(k["name"])] += k["dur"]
        entry = by_name[k["name"][:110]]
        entry[0] += k["dur"]
        entry[1] += 1
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"] if kernels else 0.0
    busy = sum(k["dur"] for k in kernels)
    with open(f"{out}/kernels_{tag}.txt", "w") as f:
        f.writelines(f"{us / 1000:9.3f} ms  {n:5d}x  {name}\n"
                     for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0]))
    return {"kernels": len(kernels), "span_ms": span / 1000, "kernel_sum_ms": busy / 1000,
            "gap_ms": (span - busy) / 1000, **{f"{c}_ms": v / 1000 for c, v in sorted(by_cat.items())}}


def clocks_during(fn, seconds: float = 6.0) -> list[str]:
    """nvidia-smi samples (SM clock, power, temperature) taken while `fn` runs in a loop."""
    proc = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu",
                             "--format=csv,noheader", "-lms", "500"], stdout=subprocess.PIPE, text=True)
    import time
    t0 = time.time()
    while time.time() - t0 < seconds:
        fn()
        torch.cuda.synchronize()
    proc.terminate()
    return proc.communicate()[0].strip().splitlines()


def gemm_rates(dtype) -> dict:
    """TFLOP/s of the step's matmul shapes in bf16 and fp8 (row-wise and tensor-wise scales)."""
    m, d = 4608, 3072
    shapes = {"qkv": (m, d, 3 * d), "single_in": (m, d, 7 * d), "proj": (m, d, d), "fc1": (m, d, 4 * d),
              "fc2": (m, 4 * d, d), "single_out": (m, 5 * d, d), "img_qkv": (4096, d, 3 * d)}
    rates = {}
    for name, (mm, k, n) in shapes.items():
        a = torch.randn(mm, k, device="cuda", dtype=dtype)
        b = torch.randn(n, k, device="cuda", dtype=dtype)
        flops = 2 * mm * n * k
        rates[f"bf16_{name}"] = flops / median_time(lambda a=a, b=b: a @ b.t(), reps=30) / 1e12
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        sa, sb = torch.ones(mm, 1, device="cuda"), torch.ones(1, n, device="cuda")
        rates[f"fp8_row_{name}"] = flops / median_time(
            lambda a8=a8, b8=b8, sa=sa, sb=sb: torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=dtype),
            reps=30) / 1e12
        one = torch.ones((), device="cuda")
        rates[f"fp8_tensor_{name}"] = flops / median_time(
            lambda a8=a8, b8=b8, one=one: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=dtype),
            reps=30) / 1e12
    return rates


def attention_rates(dtype, out: str) -> dict:
    """cuDNN SDPA at the step's shape, from contiguous [B,H,S,D] and from [B,S,H,D] views."""
    b, s, h, d = 1, 4608, 24, 128
    flops = 4 * b * h * s * s * d
    bshd = [torch.randn(b, s, h, d, device="cuda", dtype=dtype) for _ in range(3)]
    bhsd = [t.transpose(1, 2).contiguous() for t in bshd]
    views = [t.transpose(1, 2) for t in bshd]
    res = {"sdpa_bhsd": flops / median_time(lambda: F.scaled_dot_product_attention(*bhsd), reps=30) / 1e12,
           "sdpa_bshd_view": flops / median_time(lambda: F.scaled_dot_product_attention(*views), reps=30) / 1e12}
    ks = trace_kernels(lambda: F.scaled_dot_product_attention(*views), "/tmp/trace_sdpa_view.json")
    res["sdpa_bshd_view_kernels"] = [k["name"][:80] for k in ks]
    res["sdpa_view_out_stride"] = list(F.scaled_dot_product_attention(*views).stride())
    return res


def run_variant(variant: str, out: str, reference: torch.Tensor | None):
    """`variant` = dtype[:opt+opt]: fp8 or bf16; opts: fused (Triton QK-norm + RoPE), mk (inductor
    multi-kernel, i.e. persistent reductions up to 16k elements)."""
    import torch._inductor.config as inductor

    mode, _, opts = variant.partition(":")
    opts = set(filter(None, opts.split("+")))
    torch._dynamo.reset()
    inductor.triton.multi_kernel = 1 if "mk" in opts else 0
    dit = random_dit("cuda", torch.bfloat16)
    inp = inputs(dit.cfg, 1024, 1024, 512, "cuda", torch.bfloat16)
    inp = replace(inp, rope=dit.positional_tables(inp.img_ids, inp.txt_ids))
    accel = AccelConfig(compile=True, quantization="fp8" if mode == "fp8" else None, fused_kernels="fused" in opts)
    if "tq" in opts:  # fp8 activations quantised by the Triton kernel instead of inductor's code
        from ditserve.accel.fp8 import apply_fp8

        dit = apply_fp8(dit, triton_quant=True)
        accel = AccelConfig(compile=True, fused_kernels="fused" in opts)
    fast = accelerate_dit(dit, accel, torch.device("cuda"))
    step = median_time(lambda: fast(inp), warmup=3, reps=20)
    result = fast(inp)
    tag = variant.replace(":", "_").replace("+", "_")
    graph = summarise(trace_kernels(lambda: fast(inp), f"/tmp/trace_{tag}.json"), out, tag)
    row = {"step_s": step, "graph": graph, "clocks": clocks_during(lambda: fast(inp), 4.0)[-4:]}
    if reference is not None:
        row["rel_l2_vs_first"] = float((result.float() - reference.float()).norm() / reference.float().norm())
    log.info("%s: step %.4f s %s", variant, step, row)
    return row, result


def tune_qk_rope() -> dict:
    """Time the fused QK-norm + RoPE kernel over tile sizes at FLUX.1-dev's shapes; keep the best."""
    from ditserve.accel import qk_rope
    from ditserve.models.common.mmdit import QKNorm, norm_rope_qkv
    from ditserve.models.common.rope import rope_tables

    h, dh, d = 24, 128, 3072
    norm = QKNorm(dh).cuda().bfloat16()
    wide = torch.randn(1, 4608, 7 * d, device="cuda", dtype=torch.bfloat16)
    txt, img = (torch.randn(1, n, 3 * d, device="cuda", dtype=torch.bfloat16) for n in (512, 4096))
    ids = torch.randint(0, 64, (4608, 3), device="cuda").float()
    pe = rope_tables(ids, (16, 56, 56), 10000.0)
    single, double = [(wide[..., : 3 * d], norm)], [(txt, norm), (img, norm)]
    ref = norm_rope_qkv(single, pe, h)
    got = qk_rope.triton_norm_rope_qkv(single, pe, h)
    res = {"rel_err": [float((r.float() - g.float()).norm() / r.float().norm()) for r, g in zip(ref, got)]}
    gbytes = 4608 * 3 * d * 2 * 2 / 1e9
    best = None
    for block_t in (8, 16, 32, 64):
        for warps in (1, 2, 4, 8):
            qk_rope.BLOCK_T, qk_rope.NUM_WARPS = block_t, warps
            t = median_time(lambda: qk_rope.triton_norm_rope_qkv(single, pe, h), reps=30) + median_time(
                lambda: qk_rope.triton_norm_rope_qkv(double, pe, h), reps=30)
            res[f"{block_t}x{warps}_us"] = t * 1e6 / 2
            if best is None or t < best[0]:
                best = (t, block_t, warps)
    qk_rope.BLOCK_T, qk_rope.NUM_WARPS = best[1], best[2]
    res["best"] = {"block_t": best[1], "warps": best[2], "us_per_call": best[0] * 1e6 / 2,
                   "tb_per_s": gbytes / (best[0] / 2) / 1e3}
    res["reference_us"] = median_time(lambda: norm_rope_qkv(single, pe, h), reps=30) * 1e6
    return res


def sustained_matmul() -> dict:
    """bf16 and fp8 8192^3 products back to back for seconds on end, with the SM clock after."""
    from ditserve.bench.common import sustained_matmul_tflops

    res = {}
    for dtype in ("bfloat16", "fp8"):
        clock = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader"],
                               capture_output=True, text=True, check=False).stdout.strip()
        res[dtype] = {"tflops": sustained_matmul_tflops(dtype), "clock": clock}
    return res


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--variants", default="bf16,fp8")
    p.add_argument("--micro", action="store_true", help="also time the GEMM and attention shapes alone")
    p.add_argument("--sustained", action="store_true", help="also run 8192^3 products for seconds on end")
    p.add_argument("--tune", action="store_true", help="tune the fused QK-norm + RoPE kernel first")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    report: dict = {"gpu": torch.cuda.get_device_name()}
    with torch.no_grad():
        if args.micro:
            report["gemm_tflops"] = gemm_rates(torch.bfloat16)
            report["attention"] = attention_rates(torch.bfloat16, args.out)
        if args.sustained:
            report["sustained_matmul"] = sustained_matmul()
            log.info("sustained %s", report["sustained_matmul"])
        if args.tune:
            report["qk_rope_tuning"] = tune_qk_rope()
            log.info("qk_rope %s", report["qk_rope_tuning"])
        first = None
        for variant in args.variants.split(","):
            report[variant], result = run_variant(variant, args.out, first)
            first = result if first is None else first
            torch.cuda.empty_cache()
            with open(f"{args.out}/diagnose.json", "w") as f:
                json.dump(report, f, indent=2)
    if "qk_rope_tuning" in report:
        print("qk_rope", report["qk_rope_tuning"]["best"], report["qk_rope_tuning"]["rel_err"],
              "reference_us", report["qk_rope_tuning"]["reference_us"])
    if "sustained_matmul" in report:
        print("sustained", report["sustained_matmul"])
    for variant in args.variants.split(","):
        r = report[variant]
        print(f"{variant:22s} step {r['step_s'] * 1000:7.2f} ms  kernels {r['graph']['kernels']:5d}  "
              f"gemm {r['graph'].get('gemm_ms', 0):6.2f}  attn {r['graph'].get('attention_ms', 0):6.2f}  "
              f"triton {r['graph'].get('triton_ms', 0):6.2f}  rel_l2 {r.get('rel_l2_vs_first', 0):.2e}  "
              f"clk {r['clocks'][-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
