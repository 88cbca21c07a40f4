"""Where a DiT step's time goes, per acceleration variant: the kernels inside the CUDA-graph replay by
category (GEMMs, attention, our fp8 quantisers, inductor's pointwise and reduction kernels, copies), the
top kernels, the gaps between kernels, the step time the kernels do not account for, and, per block, each
attention call (Wan: self then cross) and the block's kernels in order.

The DiT is built with random weights and accelerated exactly as the step bench does it
(ditserve/bench/<family>.py: `build`, `inputs`, `accelerate_dit(AccelConfig(compile=True, ...))`; Wan 1.3B/14B,
FLUX.1-dev, CogVideoX-5B, SD3.5 Large/Medium).
Variants: `bf16`, `fp8` (fp8 linears), `attn8` (the fp8 attention backend), `fp8+attn8`; `+rows` with any of
them: AccelConfig.row_fusion (norms and fp8 quantisers as persistent reductions inside inductor's producer
kernels, which then count as `inductor_reduction`: compare the step and the reduction/quantiser totals);
`+fastacc`: AccelConfig.fp8_fast_accum (cuBLASLt's fp8 fast accumulation; the engine's default since
2026-12-05, so a variant without it is the promoted-sum baseline).
Writes <out>/diagnose_<model>.json (after every variant), kernels_<model>_<variant>.txt and the
profiler traces; prints a short summary last.

On the H200 (one GPU; ≈ 1 min per variant, most of it compiling; diffusers from .whl for `build`):
    source benchmarks/gpu_setup.sh
    python3 benchmarks/diagnose_step.py --model wan2.1-t2v-1.3b --variants bf16,fp8,fp8+attn8
`rel_l2_vs_first`: each variant's output against the first variant's.
Smoke run on the CPU (tiny Wan, CPU ops instead of kernels, no compile, graphs or fp8):
    python benchmarks/diagnose_step.py --device cpu --tiny --out /tmp
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import re
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import replace
from unittest import mock

import torch
from diagnose_flux_step import category, clocks_during, summarise, trace_kernels  # beside this file

from ditserve.bench.common import base_row, median_time, rel_l2

log = logging.getLogger("diagnose")
DTYPE = torch.bfloat16
# Our own Triton kernels: their names carry no "triton", so they are told apart by name (module, category)
OWN_KERNELS = {
    "_stats_kernel": ("attention8", "attn8_quant"),  # q, k, v amax (+ k, v column sums) partials
    "_quant_kernel": ("attention8", "attn8_quant"),  # q, k, v to e4m3 (k, v smoothed)
    "_epilogue_kernel": ("attention8", "attn8_epilogue"),  # O to bf16, v's mean added back
    "_quantize_rows_kernel": ("fp8", "fp8_quant"),  # fp8 linears' activations, per row
    "_norm_rope_rows": ("qk_rope", "qk_rope"),  # fused QK-norm + RoPE
}
CPU_GEMM = re.compile(r"::(addmm|mm|bmm|baddbmm|matmul|linear|_scaled_mm)$")
# Wan's tiny CPU architecture (tests/unit/test_bench_wan.py's): 2 blocks, 2 heads of 32
TINY_WAN = {"cls": "WanTransformer3DModel", "attention_head_dim": 32, "cross_attn_norm": True, "eps": 1e-6,
            "ffn_dim": 96, "freq_dim": 64, "in_channels": 16, "num_attention_heads": 2, "num_layers": 2,
            "out_channels": 16, "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 256,
            "text_dim": 48}
# CogVideoX's (tests/unit/test_bench_cogvideox.py's): 2 blocks, 2 heads of 16, a 64x96 video of 9 frames
TINY_COGVIDEOX = {"cls": "CogVideoXTransformer3DModel", "num_attention_heads": 2, "attention_head_dim": 16,
                  "in_channels": 4, "out_channels": 4, "num_layers": 2, "text_embed_dim": 24, "time_embed_dim": 16,
                  "use_rotary_positional_embeddings": True, "sample_width": 12, "sample_height": 8,
                  "sample_frames": 9, "patch_size": 2, "max_text_seq_length": 10}

# SD3.5's (tests/unit/test_bench_sd3.py's): 3 joint blocks, 2 heads of 16, QK RMSNorm
TINY_SD3 = {"cls": "SD3Transformer2DModel", "sample_size": 8, "patch_size": 2, "in_channels": 16, "num_layers": 3,
            "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 48,
            "caption_projection_dim": 32, "pooled_projection_dim": 40, "out_channels": 16, "pos_embed_max_size": 16,
            "qk_norm": "rms_norm"}


def kernel_category(name: str) -> str:
    """`category` refined: our quantisers by name, inductor's kernels by kind, cuDNN's
    non-attention kernels apart, CPU ops (matmul, attention, norms)."""
    if name in OWN_KERNELS:
        return OWN_KERNELS[name][1]
    n = name.lower()
    if n.startswith("triton_"):
        if "quantize" in n:
            return "inductor_fp8_quant"  # fp8 linears' activation quantisation fused by inductor
        kind = n.split("_")[1]
        return {"poi": "inductor_pointwise", "red": "inductor_reduction", "per": "inductor_reduction",
                "tem": "gemm"}.get(kind, "triton")
    if "cudnn" in n and not any(s in n for s in ("sdpa", "fmha", "flash", "attn")):
        return "conv" if "conv" in n else "cudnn_other"  # Wan's patch embedding, layout transforms
    if CPU_GEMM.search(n):
        return "gemm"
    if n.startswith("aten::") and ("attention" in n or "norm" in n):
        return "attention" if "attention" in n else "norm"
    return category(name)


# ---------------------------------------------------------------- models (as ditserve/bench builds them)

def _architectures(bench, table: dict | None):
    """The bench module reading `table` instead of the real architectures (the tiny CPU mode)."""
    return mock.patch.object(bench, "architectures", lambda: table) if table else contextlib.nullcontext()


def wan_setup(model: str, device: str, tiny: bool):
    from ditserve.bench import wan as bench

    with _architectures(bench, {model: {"transformer": TINY_WAN}} if tiny else None):
        ref, dit = bench.build(model, device, DTYPE)
    del ref
    height, width, frames = (64, 96, 5) if tiny else (480, 832, 81)
    inp = bench.inputs(dit.cfg, height, width, frames, device, DTYPE)
    grid = dit.grid(inp.latents.shape)
    inp = replace(inp, rope=dit.positional_tables(grid, device))
    return dit, inp, f"{width}x{height}x{frames}, {grid[0] * grid[1] * grid[2]}+{bench.TEXT_TOKENS} tokens"


def flux_setup(model: str, device: str, tiny: bool):
    from ditserve.bench import flux as bench

    if tiny:
        raise SystemExit("--tiny is not FLUX's")
    ref, dit = bench.build(model, device, DTYPE)
    del ref
    inp = bench.inputs(dit.cfg, 1024, 1024, 512, device, DTYPE)
    inp = replace(inp, rope=dit.positional_tables(inp.img_ids, inp.txt_ids))
    return dit, inp, f"1024x1024, {inp.img.shape[1]}+512 tokens"


def cogvideox_setup(model: str, device: str, tiny: bool):
    """CogVideoX-5B's step as its bench times it: 720x480x49, cond and uncond as one batch of two."""
    from ditserve.bench import cogvideox as bench

    with _architectures(bench, {model: {"transformer": TINY_COGVIDEOX}} if tiny else None):
        ref, dit = bench.build(model, device, DTYPE)
    del ref
    height, width, frames = (64, 96, 9) if tiny else (480, 720, 49)
    inp = bench.inputs(dit, height, width, frames, device, DTYPE)
    f, gh, gw = dit.grid(inp.latents.shape)
    return dit, inp, f"{width}x{height}x{frames}, {f * gh * gw}+{inp.context.shape[1]} tokens, batch 2 (CFG)"


def sd3_setup(model: str, device: str, tiny: bool):
    """SD3.5's step as its bench times it: 1024², 77 + 256 text tokens, cond and uncond as one batch of two."""
    from ditserve.bench import sd3 as bench

    with _architectures(bench, {model: {"transformer": TINY_SD3}} if tiny else None):
        ref, dit = bench.build(model, device, DTYPE)
    del ref
    size, txt_len = (64, 7) if tiny else (1024, bench.TXT_LEN)
    inp = bench.inputs(dit.cfg, size, size, txt_len, device, DTYPE)
    img_len = (size // 8 // dit.cfg.patch_size) ** 2
    return dit, inp, f"{size}x{size}, {img_len}+{txt_len} tokens, batch 2 (CFG)"


MODELS = {"wan2.1-t2v-1.3b": wan_setup, "wan2.1-t2v-14b": wan_setup, "flux.1-dev": flux_setup,
          "cogvideox-5b": cogvideox_setup, "sd3.5-large": sd3_setup, "sd3.5-medium": sd3_setup}


def parse_variant(variant: str) -> dict:
    """"bf16" | "fp8" | "attn8" | "fp8+attn8", each optionally "+rows", "+fastacc" -> AccelConfig's
    quantization, attention backend, row_fusion (the fp8 quantiser inside inductor's wide-row producer
    kernels) and fp8_fast_accum."""
    parts = set(variant.split("+"))
    if not parts <= {"bf16", "fp8", "attn8", "sdpa", "rows", "fastacc"}:
        raise SystemExit(f"unknown variant {variant!r}: join bf16 | fp8 with attn8 | sdpa | rows | fastacc by '+'")
    return {"quantization": "fp8" if "fp8" in parts else None, "attention": "fp8" if "attn8" in parts else "auto",
            "row_fusion": "rows" in parts, "fp8_fast_accum": "fastacc" in parts}


# ---------------------------------------------------------------- analysis

def outer_ops(ops: list[dict]) -> list[dict]:
    """CPU ops inside no other op on their thread (aten::linear, not the aten::addmm it calls): their
    times add up without counting twice, and the time between them is Python's."""
    outer, end = [], defaultdict(lambda: float("-inf"))
    for e in sorted(ops, key=lambda e: (e["ts"], -e["dur"])):
        if e["ts"] >= end[e.get("tid")]:
            outer.append(e)
            end[e.get("tid")] = e["ts"] + e["dur"]
    return outer


def gap_stats(kernels: list[dict]) -> dict:
    """Idle time between consecutive kernels: totals by size and the largest gaps with their neighbours."""
    gaps = [(max(0.0, b["ts"] - a["ts"] - a["dur"]), a["name"][:60], b["name"][:60])
            for a, b in zip(kernels, kernels[1:])]
    buckets = {"under_2us": (0, 2), "2_10us": (2, 10), "10_100us": (10, 100), "over_100us": (100, float("inf"))}
    res = {}
    for name, (lo, hi) in buckets.items():
        inside = [g for g, _, _ in gaps if lo <= g < hi]
        res[name] = {"count": len(inside), "ms": sum(inside) / 1e3}
    res["total_ms"] = sum(g for g, _, _ in gaps) / 1e3
    res["largest"] = [{"us": g, "after": a, "before": b} for g, a, b in sorted(gaps, reverse=True)[:8]]
    return res


def block_view(kernels: list[dict], blocks: int) -> dict:
    """Per-block structure from the attention kernels: with n per block, call i of a block is slot i
    (Wan: 0 self, 1 cross); and one block's kernels in order (position 0: its first attention kernel), each
    the median over the blocks of the most common length (kernels per block), with the gap before it."""
    att = [i for i, k in enumerate(kernels) if kernel_category(k["name"]) == "attention"]
    if len(att) % blocks:  # a stray attention-like kernel outside the blocks: keep names that come per block
        counts = Counter(kernels[i]["name"] for i in att)
        att = [i for i in att if counts[kernels[i]["name"]] % blocks == 0]
    if not att or len(att) % blocks:
        return {"attention_kernels": len(att)}
    per = len(att) // blocks
    slots = []
    for s in range(per):
        durs = [kernels[i]["dur"] for i in att[s::per]]
        name = Counter(kernels[i]["name"] for i in att[s::per]).most_common(1)[0][0]
        slots.append({"slot": s, "count": len(durs), "ms_per_step": sum(durs) / 1e3,
                      "median_us": statistics.median(durs), "name": name[:100]})
    res = {"attention_slots": slots}
    anchors = att[::per]
    periods = Counter(b - a for a, b in zip(anchors, anchors[1:]))
    if not periods:
        return res
    period = periods.most_common(1)[0][0]  # kernels per block (a block at a segment's edge may differ)
    starts = [a for a, b in zip(anchors, anchors[1:]) if b - a == period]
    rows, by_cat = [], defaultdict(float)
    for j in range(period):  # (kernel, the one before it) at position j of every block of that period
        pairs = [(kernels[a + j], kernels[max(0, a + j - 1)]) for a in starts]
        us = statistics.median(k["dur"] for k, _ in pairs)
        gap = statistics.median(max(0.0, k["ts"] - p["ts"] - p["dur"]) for k, p in pairs)
        name = pairs[0][0]["name"]
        by_cat[kernel_category(name)] += us
        by_cat["gap"] += gap
        rows.append({"cat": kernel_category(name), "us": us, "gap_before_us": gap, "name": name[:100]})
    block_us = statistics.median(kernels[a + period]["ts"] - kernels[a]["ts"] for a in starts)
    res.update(block_ms=block_us / 1e3, kernels_per_block=period, blocks_with_that_period=len(starts),
               block_kernels=rows,
               block_by_category_ms={c: v / 1e3 for c, v in sorted(by_cat.items(), key=lambda kv: -kv[1])})
    return res


def analyse(kernels: list[dict], step_s: float, blocks: int, out: str, tag: str) -> dict:
    """The tables for one variant from one step's kernels (or outermost CPU ops)."""
    cats = defaultdict(lambda: [0.0, 0])
    names = defaultdict(lambda: [0.0, 0])
    for k in kernels:
        for table, key in ((cats, kernel_category(k["name"])), (names, k["name"])):
            table[key][0] += k["dur"]
            table[key][1] += 1
    totals = summarise(kernels, out, tag, categorise=kernel_category)
    step_ms = step_s * 1e3
    return {
        "totals": totals,
        "step_minus_kernels_ms": step_ms - totals["kernel_sum_ms"],
        "step_minus_span_ms": step_ms - totals["span_ms"],
        "categories": {c: {"ms": us / 1e3, "count": n, "share_of_step": us / 1e3 / step_ms}
                       for c, (us, n) in sorted(cats.items(), key=lambda kv: -kv[1][0])},
        "top_kernels": [{"name": name[:120], "cat": kernel_category(name), "ms": us / 1e3, "count": n,
                         "mean_us": us / n} for name, (us, n) in sorted(names.items(), key=lambda kv: -kv[1][0])[:15]],
        "gaps": gap_stats(kernels),
        **block_view(kernels, blocks),
    }


# ---------------------------------------------------------------- one variant

def cpu_median_time(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_variant(args, variant: str, reference: torch.Tensor | None) -> tuple[dict, torch.Tensor, str]:
    """Build fresh (same seed: same weights), accelerate as the bench does, time, trace one step."""
    from ditserve.accel import accelerate_dit
    from ditserve.config import AccelConfig

    on_cuda = args.device == "cuda"
    chosen = parse_variant(variant)
    quant, attn = chosen["quantization"], chosen["attention"]
    gc.collect()
    torch._dynamo.reset()
    if on_cuda:
        torch.cuda.empty_cache()
    dit, inp, shape = MODELS[args.model](args.model, args.device, args.tiny)
    blocks = len(dit.blocks)
    # the bench's compiled rows: compile + CUDA graphs per segment (on CUDA); on the CPU no compile
    accel = AccelConfig(compile=on_cuda, **chosen)
    fast = accelerate_dit(dit, accel, torch.device(args.device))
    fn = lambda: fast(inp)  # noqa: E731
    step = median_time(fn, warmup=3, reps=args.reps) if on_cuda else cpu_median_time(fn, 1, args.reps)
    result = fn()
    tag = f"{args.model}_{variant.replace('+', '_')}"
    kernels = trace_kernels(fn, f"{args.out}/trace_{tag}.json", cpu=not on_cuda)
    if not on_cuda:
        kernels = outer_ops(kernels)
    row = {"quantization": quant, "attention": attn, "row_fusion": accel.row_fusion,
           "fp8_fast_accum": accel.fp8_fast_accum, "compile": accel.compile,
           "cuda_graphs": on_cuda and accel.cuda_graphs, "blocks": blocks,
           "step_s": step, "step_ms": step * 1e3, "finite": bool(torch.isfinite(result).all()),
           **analyse(kernels, step, blocks, args.out, tag)}
    if reference is not None:
        row["rel_l2_vs_first"] = rel_l2(result, reference)
    if on_cuda and args.clocks > 0:
        row["clocks"] = clocks_during(fn, args.clocks)[-3:]
    log.info("%s: step %.2f ms, kernels %.2f ms, %s", variant, row["step_ms"], row["totals"]["kernel_sum_ms"],
             {c: round(v["ms"], 2) for c, v in row["categories"].items()})
    return row, result, shape


def summary_lines(report: dict) -> list[str]:
    lines = [f"{report['model']} {report['shape']} on {report['gpu']}"]
    for variant, r in report["variants"].items():
        t = r["totals"]
        lines.append(f"{variant:12s} step {r['step_ms']:8.2f} ms  kernels {t['kernels']:5d} "
                     f"sum {t['kernel_sum_ms']:8.2f}  gaps {r['gaps']['total_ms']:6.2f}  "
                     f"step-kernels {r['step_minus_kernels_ms']:6.2f}  "
                     f"rel_l2 {r.get('rel_l2_vs_first', 0):.2e}")
        lines.append("    " + "  ".join(f"{c} {v['ms']:.2f}/{v['count']}" for c, v in r["categories"].items()))
        if "attention_slots" in r:
            lines.append("    attention per block slot: " + "  ".join(
                f"{s['slot']}: {s['count']} x {s['median_us'] / 1e3:.3f} = {s['ms_per_step']:.2f} ms"
                for s in r["attention_slots"]))
        if "block_ms" in r:
            lines.append(f"    one block {r['block_ms']:.3f} ms x {r['blocks']}: " + "  ".join(
                f"{c} {ms:.3f}" for c, ms in r["block_by_category_ms"].items()))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="wan2.1-t2v-1.3b", choices=sorted(MODELS))
    p.add_argument("--variants", default="bf16,fp8,fp8+attn8",
                   help="comma-separated: bf16, fp8, attn8, fp8+attn8, each optionally +rows, +fastacc")
    p.add_argument("--quantization", choices=("none", "fp8"), help="with --attention-backend: one variant")
    p.add_argument("--attention-backend", choices=("sdpa", "fp8"), help="with --quantization: one variant")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="a tiny architecture (the CPU smoke run; not FLUX)")
    p.add_argument("--reps", type=int, default=None, help="timed steps per variant (default 10; 2 on the CPU)")
    p.add_argument("--clocks", type=float, default=3.0, help="seconds of nvidia-smi samples per variant (0: none)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    args.reps = args.reps or (10 if args.device == "cuda" else 2)
    if args.quantization or args.attention_backend:
        args.variants = ("fp8" if args.quantization == "fp8" else "bf16") + (
            "+attn8" if args.attention_backend == "fp8" else "")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    os.makedirs(args.out, exist_ok=True)
    report = base_row(args.model, "bfloat16", "")
    report.update(device=args.device, tiny=args.tiny, variants={})
    path = f"{args.out}/diagnose_{args.model}.json"
    first = None
    with torch.no_grad():
        for variant in args.variants.split(","):
            report["variants"][variant], result, report["shape"] = run_variant(args, variant, first)
            first = result if first is None else first
            with open(path, "w") as f:
                json.dump(report, f, indent=2)
    log.info("wrote %s", path)
    print("\n".join(summary_lines(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
