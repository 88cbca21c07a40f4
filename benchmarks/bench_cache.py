"""Step-cache speed on the GPU: FLUX.1-dev or Wan2.1-T2V-1.3B at real size with random weights, ours
side by side with diffusers' own first-block cache on the same weights and inputs.

Random weights decide nothing about quality, only time. So each path is timed on its own: a denoising
step that computes (threshold 0: never skips; the cache's bookkeeping on top of every block), a step
that reuses the cache (a threshold nothing reaches: the probe, the decision's host sync and the cached
residual added, the skipped blocks not run) and the plain step without a cache. The wall time per
image or video then follows from a skip pattern measured on the trained demo model
(benchmarks/results/cache_quality_demo_cpu.json, by benchmarks/cache_quality.py): per method at its
recommended setting, est_step = (1 - skipped) * computed + skipped * reused.

diffusers' first-block cache (`enable_cache(FirstBlockCacheConfig)`) is timed the same way: a
threshold of -1 always computes (its test is `change > threshold`, and identical inputs change by
exactly 0), 1e30 reuses after the first call. Its blocks are compiled with `compile_repeated_blocks`
(fullgraph off: the hook's decision is a graph break), over the hooks, before ours is compiled (so with
inductor's default settings; ours turns on coordinate-descent tuning); should that fail, eager, and the
JSON says which. A step is what each runs per denoising step at the checkpoint's defaults: FLUX.1-dev
one call (guidance embedded); Wan CFG, ours as one batch of 2 (cond and uncond cached apart),
diffusers' pipeline as two calls in their cache contexts.

    python benchmarks/bench_cache.py --model flux.1-dev [--compile] [--fp8] [--out FILE]
    python benchmarks/bench_cache.py --model wan2.1-t2v-1.3b --compile --out FILE
    python benchmarks/bench_cache.py --model flux.1-dev --tiny     # CPU smoke run at toy size

`--fp8` times ours a second time with fp8 linears in the same process (diffusers stays bf16: its rows
are the bf16 peer). benchmarks/gpu_cache.sh holds the H200 commands.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass, replace
from itertools import count
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ditserve.accel import accelerate_dit, cache_dit  # noqa: E402
from ditserve.accel.cache import step_cache  # noqa: E402
from ditserve.api import InvalidRequest  # noqa: E402
from ditserve.bench.common import MATMUL_TFLOPS, arch_kwargs, architectures, base_row, random_pair  # noqa: E402
from ditserve.config import AccelConfig  # noqa: E402
from ditserve.config.engine import CacheConfig  # noqa: E402
from ditserve.models.common.dit import StepContext  # noqa: E402

log = logging.getLogger("bench_cache")

QUALITY_JSON = ROOT / "benchmarks" / "results" / "cache_quality_demo_cpu.json"
# Each method at its recommended setting, by its label in the demo sweep (whose keys give the method,
# TaylorSeer order, fn, bn; the threshold only sets the skip share, taken from the sweep). "first-block
# 0.08" is there for the side by side with diffusers' FBCache, which has no TaylorSeer. dual-block
# without fn probes the model's default: the demo's 1 of 6 blocks, FLUX.1-dev's 8 of 57, Wan 1.3B's 7 of 30.
SETTINGS = ("first-block 0.08", "first-block 0.08 +TS1", "dual-block F1B0 0.15 w3 +TS2", "teacache 0.60 +TS1")
SKIP_RATES = (0.5, 0.6, 0.75)
SKIP_NOTE = ("skip shares measured on the trained demo model (FLUX architecture, 6 blocks, CPU float32): a proxy "
             "for the real checkpoint, whose share at a given threshold differs (teacache's threshold is on the "
             "family's own fit); the paths' times are the real model's")
HUGE = 1e30  # a threshold no change measure reaches: every call after the first reuses


@dataclass(frozen=True)
class Family:
    """What one denoising step is at the checkpoint's defaults, and the stages around the loop."""

    steps: int  # the pipeline's default denoising steps
    branches: tuple[str, ...]  # CFG: ours runs them as one batch, diffusers one call each
    size: tuple[int, int, int]  # height, width, frames (1: an image)
    tiny_size: tuple[int, int, int]
    # encoders + VAE decode per image/video, bf16 on one H200 (../shared/GPU.md, 2026-11-21): FLUX T5-XXL
    # 0.024 + CLIP-L 0.004 + VAE 1024² 0.085 s; Wan UMT5 (≈ T5-XXL) twice (prompt, negative) + VAE 480p×81 1.83 s
    other_stages_s: float


FAMILIES = {
    "flux.1-dev": Family(28, ("cond",), (1024, 1024, 1), (64, 64, 1), 0.024 + 0.004 + 0.085),
    "wan2.1-t2v-1.3b": Family(50, ("cond", "uncond"), (480, 832, 81), (32, 32, 5), 2 * 0.024 + 1.83),
}
# toy architectures for --tiny (CPU). No published teacache fit has the tiny Wan's width: there
# teacache is refused, as for any Wan shape without one, and the run goes on without it.
TINY_ARCH = {
    "flux.1-dev": dict(cls="FluxTransformer2DModel", patch_size=1, in_channels=16, num_layers=2,
                       num_single_layers=4, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                       pooled_projection_dim=20, guidance_embeds=True, axes_dims_rope=[4, 6, 6]),
    "wan2.1-t2v-1.3b": dict(cls="WanTransformer3DModel", attention_head_dim=16, cross_attn_norm=True, eps=1e-6,
                            ffn_dim=64, freq_dim=32, in_channels=16, num_attention_heads=2, num_layers=2,
                            out_channels=16, patch_size=[1, 2, 2], qk_norm="rms_norm_across_heads",
                            rope_max_seq_len=64, text_dim=16),
}


@dataclass
class Case:
    """A model pair with one step's inputs: ours (CFG branches batched) and diffusers' calls."""

    ref: torch.nn.Module
    ours: torch.nn.Module
    inp: object  # ours' model input for one step
    ref_calls: list[tuple[str, dict]]  # (cache context, keyword arguments) per diffusers call
    shape: str
    step_flops: float


def build_case(model: str, tiny: bool, device: str, dtype: torch.dtype) -> Case:
    """diffusers' model with random weights (×0.5) and ours holding the same values, with one step's inputs."""
    arch = arch_kwargs(TINY_ARCH[model] if tiny else architectures()[model]["transformer"])
    fam = FAMILIES[model]
    height, width, frames = fam.tiny_size if tiny else fam.size
    if model == "flux.1-dev":
        return _flux_case(arch, height, width, 8 if tiny else 512, device, dtype)
    return _wan_case(arch, height, width, frames, len(fam.branches), device, dtype)


def _flux_case(arch: dict, height: int, width: int, txt_len: int, device: str, dtype: torch.dtype) -> Case:
    from diffusers import FluxTransformer2DModel

    from ditserve.bench import flux
    from ditserve.models.flux.config import FluxConfig
    from ditserve.models.flux.model import FluxDiT
    from ditserve.models.flux.weights import flux_key_map

    cfg = FluxConfig.from_dict(arch)
    ref, ours = random_pair(FluxTransformer2DModel, arch, FluxDiT, cfg, flux_key_map(cfg), device, dtype)
    inp = flux.inputs(cfg, height, width, txt_len, device, dtype)
    ref_kwargs = dict(hidden_states=inp.img, encoder_hidden_states=inp.txt, pooled_projections=inp.pooled,
                      timestep=inp.timesteps, img_ids=inp.img_ids, txt_ids=inp.txt_ids, guidance=inp.guidance)
    inp = replace(inp, rope=ours.positional_tables(inp.img_ids, inp.txt_ids))  # once per run, as pipelines do
    tokens = inp.img.shape[1]
    return Case(ref, ours, inp, [("cond", ref_kwargs)], f"{width}x{height}, {tokens}+{txt_len} tokens",
                flux.step_flops(cfg, tokens, txt_len))


def _wan_case(arch: dict, height: int, width: int, frames: int, cfg_batch: int, device: str,
              dtype: torch.dtype) -> Case:
    from diffusers import WanTransformer3DModel

    from ditserve.bench import wan
    from ditserve.models.wan.config import WanConfig
    from ditserve.models.wan.model import WanDiT, WanInputs
    from ditserve.models.wan.weights import wan_key_map

    cfg = WanConfig.from_dict(arch)
    ref, ours = random_pair(WanTransformer3DModel, arch, WanDiT, cfg, wan_key_map(cfg), device, dtype)
    cond = wan.inputs(cfg, height, width, frames, device, dtype)
    gen = torch.Generator(device).manual_seed(2)
    contexts = [cond.context] + [torch.randn(cond.context.shape, generator=gen, device=device, dtype=dtype)
                                 for _ in range(cfg_batch - 1)]  # the negative prompt's states
    grid = ours.grid(cond.latents.shape)
    inp = WanInputs(latents=cond.latents.repeat(cfg_batch, 1, 1, 1, 1), timesteps=cond.timesteps.repeat(cfg_batch),
                    context=torch.cat(contexts), rope=ours.positional_tables(grid, device))
    names = FAMILIES["wan2.1-t2v-1.3b"].branches
    ref_calls = [(name, dict(hidden_states=cond.latents, timestep=cond.timesteps, encoder_hidden_states=c))
                 for name, c in zip(names, contexts)]
    tokens = grid[0] * grid[1] * grid[2]
    return Case(ref, ours, inp, ref_calls, f"{width}x{height}x{frames}, {tokens}+{wan.TEXT_TOKENS} tokens, "
                f"CFG {cfg_batch}", cfg_batch * wan.step_flops(cfg, tokens))


def timed(fn, device: str, warmup: int, reps: int) -> float:
    """Median seconds of `fn()` after `warmup` calls, synchronised on CUDA before each clock read."""
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def settings(path: Path = QUALITY_JSON, labels=SETTINGS) -> dict[str, dict]:
    """Per recommended setting: its CacheConfig keys and the demo's skipped share at 20 and 50 steps."""
    runs = json.loads(path.read_text())["runs"]
    out = {}
    for label in labels:
        rows = {r["steps"]: r for r in runs if r["config"] == label}
        if not rows:
            raise SystemExit(f"{label!r} is not in {path}")
        keys = next(iter(rows.values()))["keys"]
        out[label] = {"keys": keys, "skipped": {steps: r["skipped"] for steps, r in sorted(rows.items())}}
    return out


def skip_at(skipped: dict[int, float], steps: int) -> tuple[float, str]:
    """The demo's skipped share at `steps`: a measured row, else linear in the step count between the
    nearest measured ones (clamped at the ends), and how it was obtained."""
    if steps in skipped:
        return skipped[steps], f"measured at {steps} steps"
    known = sorted(skipped)
    lo = max([s for s in known if s < steps], default=known[0])
    hi = min([s for s in known if s > steps], default=known[-1])
    if lo == hi:
        return skipped[lo], f"the {lo}-step row (nearest)"
    f = skipped[lo] + (skipped[hi] - skipped[lo]) * (steps - lo) / (hi - lo)
    return f, f"interpolated between the {lo}- and {hi}-step rows"


@torch.no_grad()
def time_ours(dit, accel: AccelConfig, device: str, inp, branches: tuple[str, ...], keys: dict,
              warmup: int, reps: int) -> dict:
    """One method's computed and reused steps. Both wrappers share the run's per-branch states and a
    rising step index, so the reused steps start from a full TaylorSeer history."""
    states, steps = tuple({} for _ in branches), count()

    def stepper(model):
        return lambda: model(inp, StepContext(next(steps), 10 ** 9, 0, branches, states))

    keys = {k: v for k, v in keys.items() if k != "threshold"}
    keys["warmup_steps"] = 0  # warm-up is part of the skip pattern, not of either path's time
    dev = torch.device(device)
    computed = cache_dit(dit, replace(accel, cache=CacheConfig(**keys, threshold=0.0)), dev)
    reused = cache_dit(dit, replace(accel, cache=CacheConfig(**keys, threshold=HUGE)), dev)
    t_computed = timed(stepper(computed), device, warmup, reps)
    before = step_cache(reused).totals.skipped
    t_reused = timed(stepper(reused), device, warmup, reps)
    reuses = step_cache(reused).totals.skipped - before
    assert step_cache(computed).totals.skipped == 0 and reuses == warmup + reps, (reuses, warmup + reps)
    policy = step_cache(computed).policy  # fn/bn as resolved for this model (dual-block's default probe)
    return {"computed_step_s": t_computed, "reused_step_s": t_reused, "fn": policy.fn, "bn": policy.bn,
            "taylorseer_order": policy.order}


def _fbc_head(ref):
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    for module in ref.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(_FBC_LEADER_BLOCK_HOOK) is not None:
            return registry.get_hook(_FBC_LEADER_BLOCK_HOOK)
    raise RuntimeError("diffusers' first-block cache hook not found")


@torch.no_grad()
def time_diffusers(case: Case, device: str, compiled: bool, warmup: int, reps: int) -> dict:
    """diffusers' step (its calls in their cache contexts): plain, then under its FBCache computing
    (threshold -1) and reusing (1e30). Compiled regionally over the hooks when `compiled`; a failure
    there falls back to eager for all three, said in `mode`."""
    from diffusers.hooks import FirstBlockCacheConfig
    from torch._dynamo.utils import counters

    ref = case.ref

    def step():
        for name, kwargs in case.ref_calls:
            with ref.cache_context(name):
                ref(**kwargs, return_dict=False)

    def fbc_states():
        return [s.should_compute for s in _fbc_head(ref).state_manager._state_cache.values()]

    def measure():
        row = {"plain_step_s": timed(step, device, warmup, reps)}
        ref.enable_cache(FirstBlockCacheConfig(threshold=-1.0))
        try:
            row["computed_step_s"] = timed(step, device, warmup, reps)
            assert all(fbc_states()), "diffusers' FBCache skipped at threshold -1"
            _fbc_head(ref).threshold = HUGE
            row["reused_step_s"] = timed(step, device, warmup, reps)
            assert not any(fbc_states()), "diffusers' FBCache computed at threshold 1e30"
        finally:
            ref.disable_cache()
        return row

    if not compiled:
        return {"mode": "eager", **measure()}
    counters.clear()
    ref.compile_repeated_blocks(fullgraph=False)
    try:
        row = {"mode": "compile_repeated_blocks (fullgraph=False), over the FBCache hooks", **measure()}
    except Exception as exc:  # the peer's failure is a result to report, then eager
        log.warning("diffusers compiled with FBCache failed (%s); timing eager", exc)
        for module in ref.modules():
            module._compiled_call_impl = None
        row = {"mode": f"eager (compiled with the hooks failed: {type(exc).__name__}: {exc})"[:300], **measure()}
    row["dynamo"] = {"unique_graphs": counters["stats"].get("unique_graphs", 0),
                     "graph_breaks": sum(counters["graph_break"].values())}
    return row


@torch.no_grad()
def time_precision(case: Case, accel: AccelConfig, device: str, labels: dict, warmup: int, reps: int) -> dict:
    """Ours at one precision: the plain step and each method's two paths."""
    dit = accelerate_dit(case.ours, accel, torch.device(device))
    inp = case.inp
    out = dit(inp)
    paths = {"plain_step_s": timed(lambda: dit(inp), device, warmup, reps),
             "output_finite": bool(torch.isfinite(out).all()), "methods": {}}
    branches = tuple(name for name, _ in case.ref_calls)
    for label, setting in labels.items():
        try:
            t = time_ours(dit, accel, device, inp, branches, setting["keys"], warmup, reps)
        except InvalidRequest as exc:  # the method does not apply to this model (no teacache fit)
            paths["methods"][label] = {"refused": str(exc)}
            log.warning("%s: refused: %s", label, exc)
            continue
        except Exception as exc:  # one method's failure must not cost the run's other numbers
            paths["methods"][label] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            log.exception("%s failed", label)
            continue
        t["speedup_at"] = {str(f): paths["plain_step_s"] / ((1 - f) * t["computed_step_s"] + f * t["reused_step_s"])
                           for f in SKIP_RATES}
        paths["methods"][label] = t
        log.info("%-30s computed %.4f s (plain %.4f)  reused %.4f s", label, t["computed_step_s"],
                 paths["plain_step_s"], t["reused_step_s"])
        if device.startswith("cuda"):
            gc.collect()
            torch.cuda.empty_cache()
    return paths


def rows(result: dict, labels: dict) -> list[dict]:
    """Per precision and method: both paths, the demo's skip share at the run's step count and the
    estimated step and image/video wall time; diffusers' FBCache at the same share for first-block."""
    steps, other, peer = result["steps"], result["other_stages_s"], result.get("diffusers")
    common = {k: result[k] for k in ("model", "gpu", "commit", "shape", "steps")}
    out = []
    for precision, paths in result["paths"].items():
        plain = paths["plain_step_s"]
        entries = [("uncached", None, plain, None, 0.0, "no cache", {})]
        for label, t in paths["methods"].items():
            if "computed_step_s" not in t:
                continue
            f, source = skip_at(labels[label]["skipped"], steps)
            method = labels[label]["keys"]["method"]
            policy = {"probe_blocks": t["fn"], "tail_blocks": t["bn"], "taylorseer_order": t["taylorseer_order"]}
            entries.append((label, method, t["computed_step_s"], t["reused_step_s"], f, source, policy))
        for label, method, computed, reused, f, source, policy in entries:
            est = computed if reused is None else (1 - f) * computed + f * reused
            row = {**common, "precision": precision, "method": label, **policy, "computed_step_s": computed,
                   "reused_step_s": reused, "skip_fraction": f, "skip_source": source, "est_step_s": est,
                   "speedup_vs_uncached": plain / est, "est_wall_s": steps * est + other,
                   "uncached_wall_s": steps * plain + other}
            row["wall_speedup_vs_uncached"] = row["uncached_wall_s"] / row["est_wall_s"]
            if peer is not None and method in (None, "first-block"):
                row.update(_peer_fields(row, peer, f, steps, other, taylorseer="+TS" in label))
                row["diffusers_precision"] = result["dtype"]
            out.append(row)
    return out


def _peer_fields(row: dict, peer: dict, f: float, steps: int, other: float, taylorseer: bool) -> dict:
    uncached = row["reused_step_s"] is None
    computed = peer["plain_step_s"] if uncached else peer["computed_step_s"]
    reused = None if uncached else peer["reused_step_s"]
    est = computed if uncached else (1 - f) * computed + f * reused
    fields = {"diffusers_method": "uncached" if uncached else "FBCache" + (" (no TaylorSeer)" if taylorseer else ""),
              "diffusers_mode": peer["mode"], "diffusers_computed_step_s": computed,
              "diffusers_reused_step_s": reused, "diffusers_est_step_s": est,
              "diffusers_speedup_vs_uncached": peer["plain_step_s"] / est, "diffusers_est_wall_s": steps * est + other,
              "ours_over_diffusers_computed": row["computed_step_s"] / computed,
              "ours_over_diffusers_est": row["est_step_s"] / est}
    if reused is not None:
        fields["ours_over_diffusers_reused"] = row["reused_step_s"] / reused
    return fields


def table(rows_: list[dict]) -> str:
    """The rows as a markdown table (seconds per step; wall per image/video)."""
    head = ("| precision | method | computed | reused | skipped | est. step | speed-up | wall | "
            "diffusers computed / reused / est. | ours ÷ diffusers (est.) |\n" + "|---" * 10 + "|\n")

    def s(v, fmt="{:.4f}"):
        return "—" if v is None else fmt.format(v)

    lines = []
    for r in rows_:
        peer = (f"{s(r['diffusers_computed_step_s'])} / {s(r['diffusers_reused_step_s'])} / "
                f"{s(r['diffusers_est_step_s'])}") if "diffusers_est_step_s" in r else "—"
        lines.append(f"| {r['precision']} | {r['method']} | {s(r['computed_step_s'])} | {s(r['reused_step_s'])} | "
                     f"{r['skip_fraction']:.0%} | {s(r['est_step_s'])} | {r['speedup_vs_uncached']:.2f}x | "
                     f"{r['est_wall_s']:.2f} s | {peer} | {s(r.get('ours_over_diffusers_est'), '{:.2f}')} |")
    return head + "\n".join(lines) + "\n"


def bench(args: argparse.Namespace) -> dict:
    """Ours (bf16, then fp8 with --fp8) and diffusers' FBCache on one model; rows written to
    `args.out` after each part, so a later part's failure keeps the earlier numbers."""
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    fam = FAMILIES[args.model]
    labels = settings(args.quality, args.settings)
    warmup, reps = args.warmup, args.reps
    case = build_case(args.model, args.tiny, device, dtype)
    name = args.model + (" (tiny)" if args.tiny else "")
    result = {**base_row(name, str(dtype).removeprefix("torch."), case.shape), "compile": args.compile,
              "steps": args.steps or fam.steps, "branches": list(fam.branches),
              "step_tflop": case.step_flops / 1e12,
              "floor_step_s": case.step_flops / (MATMUL_TFLOPS["bfloat16"] * 1e12),
              "fp8_floor_step_s": case.step_flops / (MATMUL_TFLOPS["fp8"] * 1e12), "skip_note": SKIP_NOTE,
              "other_stages_s": fam.other_stages_s, "quality_json": str(args.quality.relative_to(ROOT))
              if args.quality.is_relative_to(ROOT) else str(args.quality),
              "warmup": warmup, "reps": reps, "settings": labels, "paths": {}}

    def save():
        result["rows"] = rows(result, labels)
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")

    if not args.no_diffusers:  # first: inductor's default config, as a diffusers user compiles
        result["diffusers"] = time_diffusers(case, device, args.compile, warmup, reps)
        log.info("diffusers: %s", result["diffusers"])
        save()
    accel = AccelConfig(compile=args.compile)
    result["paths"]["bf16" if not args.tiny else "fp32"] = time_precision(case, accel, device, labels, warmup, reps)
    save()
    if args.fp8:  # main() turns it off for --tiny
        del case
        torch._dynamo.reset()  # first: compiled code holds the old models
        gc.collect()
        torch.cuda.empty_cache()
        case = build_case(args.model, args.tiny, device, dtype)  # same seed: the same weights and inputs
        case.ref = None
        result["paths"]["fp8"] = time_precision(case, replace(accel, quantization="fp8"), device, labels, warmup, reps)
        save()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(FAMILIES), default="flux.1-dev")
    p.add_argument("--compile", action="store_true", help="compile the blocks (ours: + segment CUDA graphs; "
                   "diffusers: compile_repeated_blocks)")
    p.add_argument("--fp8", action="store_true", help="also time ours with fp8 linears (GPU)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the checkpoint's: 28, 50)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), metavar="LABEL",
                   help="methods by their label in the quality JSON")
    p.add_argument("--quality", type=Path, default=QUALITY_JSON, help="the demo sweep giving the skip shares")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--no-diffusers", action="store_true", help="skip the diffusers side")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run at toy size (no compile, no fp8)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    big = args.model == "wan2.1-t2v-1.3b" and not args.tiny  # ≈ 1 s a computed step
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny or big else 3)
    args.reps = args.reps if args.reps is not None else (2 if args.tiny else 4 if big else 10)
    if args.tiny:
        args.compile = args.fp8 = False
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = bench(args)
    sys.stdout.write(f"{result['model']} on {result['gpu']} at {result['commit']}, {result['shape']}, "
                     f"{result['steps']} steps (wall = steps × est. step + {result['other_stages_s']:.3f} s "
                     "of encoders and decode)\n" + table(result["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
