"""Step-cache paths timed on FLUX.1-dev at real size with random weights (GPU).

For each method: a DiT call that computes (the cache's bookkeeping on top of every block), a call
that reuses the cache (probe blocks, the decision's host sync, the residual added; the cached blocks
not run), and the plain forward without a cache; from those, the mean step time and speed-up at a
few skip rates (the share a method skips is a quality question: benchmarks/cache_quality.py).

    python benchmarks/bench_cache.py [--height 1024 --width 1024] [--batch 1] [--compile] [--fp8] \
        [--out benchmarks/results/cache_paths_h200.json]
    python benchmarks/bench_cache.py --tiny        # a CPU smoke run of the script on a tiny FLUX

Random weights decide nothing about quality here, only time: the computed path runs at threshold 0
(never skips), the reused path at a threshold nothing reaches (skips every call after the first).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ditserve.accel.cache import apply_cache, step_cache  # noqa: E402
from ditserve.config.engine import CacheConfig  # noqa: E402
from ditserve.models.common.dit import StepContext  # noqa: E402

log = logging.getLogger("bench_cache")

METHODS = {
    "first-block": dict(method="first-block"),
    "first-block +TS1": dict(method="first-block", taylorseer_order=1),
    "dual-block F8B0": dict(method="dual-block", fn=8, bn=0),
    "dual-block F1B1 +TS2": dict(method="dual-block", fn=1, bn=1, taylorseer_order=2),
    "teacache": dict(method="teacache"),
}
SKIP_RATES = (0.5, 0.6, 0.75)


def build_dit(tiny: bool, device: str, dtype: torch.dtype, fp8: bool, compile_: bool):
    """FLUX.1-dev's DiT (or a tiny one) with random weights scaled so the deep stack stays finite."""
    from ditserve.bench.common import arch_kwargs, architectures
    from ditserve.models.flux.config import FluxConfig
    from ditserve.models.flux.model import FluxDiT

    if tiny:
        cfg = FluxConfig(in_channels=16, num_layers=10, num_single_layers=4, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20,
                         guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    else:
        cfg = FluxConfig.from_dict(arch_kwargs(architectures()["flux.1-dev"]["transformer"]))
    torch.manual_seed(0)
    with torch.device(device):
        dit = FluxDiT(cfg).to(dtype).eval().requires_grad_(False)
    with torch.no_grad():
        for p in dit.parameters():
            p.mul_(0.5)
    if fp8:
        from ditserve.accel.fp8 import apply_fp8

        dit = apply_fp8(dit)
    if compile_:
        from ditserve.accel.compile import apply_compile

        dit = apply_compile(dit)
    return dit


def flux_inputs(cfg, height: int, width: int, batch: int, device: str, dtype: torch.dtype):
    from ditserve.bench.flux import inputs

    return inputs(cfg, height, width, 512 if height >= 256 else 8, device, dtype, batch)


def timed(fn, device: str, warmup: int = 3, reps: int = 10) -> float:
    """Median seconds of `fn()` (synchronised on CUDA)."""
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


class Steps:
    """Successive model calls of one run: a fresh step index each call, states kept."""

    def __init__(self, model, inp):
        self.model, self.inp, self.step, self.states = model, inp, 0, ({},)

    def __call__(self):
        ctx = StepContext(self.step, 10 ** 9, 0, ("cond",), self.states)
        self.step += 1
        return self.model(self.inp, ctx)


def bench(args: argparse.Namespace) -> dict:
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    graphs = args.compile and device == "cuda"
    dit = build_dit(args.tiny, device, dtype, args.fp8, args.compile)
    inp = flux_inputs(dit.cfg, args.height, args.width, args.batch, device, dtype)
    if graphs:
        from ditserve.accel.segments import SegmentedDiT

        plain = SegmentedDiT(dit, graphs=True)
    else:
        plain = dit
    with torch.no_grad():
        base = timed(lambda: plain(inp), device)
    rows = {}
    for name, keys in METHODS.items():
        computed = Steps(apply_cache(dit, CacheConfig(**{**keys, "threshold": 0.0}), graphs=graphs), inp)
        reused = Steps(apply_cache(dit, CacheConfig(**{**keys, "threshold": 1e30}), graphs=graphs), inp)
        t_computed, t_reused = timed(computed, device), timed(reused, device)
        assert step_cache(reused.model).totals.skipped > 0 and step_cache(computed.model).totals.skipped == 0
        rows[name] = {"computed_s": t_computed, "reused_s": t_reused, "reused_over_plain": t_reused / base,
                      "speedup_at": {str(f): base / ((1 - f) * t_computed + f * t_reused) for f in SKIP_RATES}}
        log.info("%-22s computed %.4f s (plain %.4f)  reused %.4f s  speed-up at 60%% skipped %.2fx", name, t_computed,
                 base, t_reused, rows[name]["speedup_at"]["0.6"])
    shape = f"{args.height}x{args.width} batch {args.batch}"
    from ditserve.bench.common import base_row

    row = base_row("flux.1-dev" if not args.tiny else "tiny-flux", str(dtype).removeprefix("torch."), shape)
    return {**row, "compile": args.compile, "fp8": args.fp8, "plain_s": base, "methods": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="compile the blocks and replay segments as CUDA graphs")
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny FLUX")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.tiny:
        args = replace_sizes(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = bench(args)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)  # noqa: T201 - the command's output
    return 0


def replace_sizes(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "height": 64, "width": 64, "fp8": False, "compile": False})


if __name__ == "__main__":
    sys.exit(main())
