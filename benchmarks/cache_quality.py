"""Step-caching quality on the trained demo model (the only trained model here), on the CPU.

For each method and threshold, at 20 and 50 steps: the share of DiT forwards that reused cached work,
the facts accuracy of the held-out prompts x seeds (training/demo's checker) against the uncached
run, and the PSNR of every image against the uncached image of the same prompt and seed. Requests
run one at a time, as a lone request would.

    python benchmarks/cache_quality.py [--seeds 0 1 2] [--count 48] [--steps 20 50] \
        [--out benchmarks/results/cache_quality_demo_cpu.json]

PSNR is per image on uint8 RGB; an image equal to the uncached one counts as 100 dB in the mean
(`identical` says how many were).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ditserve import demo  # noqa: E402
from ditserve.accel.cache import apply_cache, step_cache  # noqa: E402
from ditserve.config import EngineConfig, ModelConfig  # noqa: E402
from ditserve.config.engine import CacheConfig  # noqa: E402
from ditserve.runtime.engine import Engine  # noqa: E402
from ditserve.runtime.generator import Generator  # noqa: E402
from training.demo.checker import check  # noqa: E402
from training.demo.evaluate import held_out_combos  # noqa: E402

log = logging.getLogger("cache_quality")

IDENTICAL_DB = 100.0

# (label, CacheConfig keys): thresholds around where each method starts to skip on the demo model
CONFIGS = [
    ("first-block 0.05", dict(method="first-block", threshold=0.05)),
    ("first-block 0.08", dict(method="first-block", threshold=0.08)),
    ("first-block 0.10", dict(method="first-block", threshold=0.10)),
    ("first-block 0.15", dict(method="first-block", threshold=0.15)),
    ("first-block 0.08 +TS1", dict(method="first-block", threshold=0.08, taylorseer_order=1)),
    ("first-block 0.10 +TS1", dict(method="first-block", threshold=0.10, taylorseer_order=1)),
    ("first-block 0.15 +TS1", dict(method="first-block", threshold=0.15, taylorseer_order=1)),
    ("first-block 0.20 +TS1", dict(method="first-block", threshold=0.20, taylorseer_order=1)),
    ("dual-block F1B0 0.15 w3 +TS2", dict(method="dual-block", threshold=0.15, warmup_steps=3, taylorseer_order=2)),
    ("dual-block F1B0 0.20 w3 +TS2", dict(method="dual-block", threshold=0.20, warmup_steps=3, taylorseer_order=2)),
    ("dual-block F1B1 0.15 +TS1", dict(method="dual-block", threshold=0.15, bn=1, taylorseer_order=1)),
    ("dual-block F1B1 0.20 +TS1", dict(method="dual-block", threshold=0.20, bn=1, taylorseer_order=1)),
    ("dual-block F2B0 0.15 +TS1", dict(method="dual-block", threshold=0.15, fn=2, taylorseer_order=1)),
    ("teacache 0.25", dict(method="teacache", threshold=0.25)),
    ("teacache 0.40", dict(method="teacache", threshold=0.40)),
    ("teacache 0.60", dict(method="teacache", threshold=0.60)),
    ("teacache 0.40 +TS1", dict(method="teacache", threshold=0.40, taylorseer_order=1)),
    ("teacache 0.60 +TS1", dict(method="teacache", threshold=0.60, taylorseer_order=1)),
    ("teacache 0.80 +TS1", dict(method="teacache", threshold=0.80, taylorseer_order=1)),
    ("teacache 1.00 +TS1", dict(method="teacache", threshold=1.00, taylorseer_order=1)),
]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return IDENTICAL_DB if mse == 0 else min(IDENTICAL_DB, 10 * math.log10(255.0 ** 2 / mse))


def run_config(gen: Generator, cases, steps: int) -> tuple[list[np.ndarray], list[dict], float]:
    images, facts = [], []
    start = time.perf_counter()
    for combo, seed in cases:
        image = np.asarray(gen.generate(combo.caption, seed=seed, num_inference_steps=steps).images[0])
        images.append(image)
        facts.append(check(image, combo))
    return images, facts, (time.perf_counter() - start) / len(cases)


def accuracy(facts: list[dict]) -> float:
    values = [ok for r in facts for ok in r.values()]
    return sum(values) / len(values)


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    engine = Engine.from_config(EngineConfig(ModelConfig(str(demo.model_path()), "cpu", "float32")))
    base, gen = engine.pipeline.dit, Generator(engine)
    cases = [(combo, seed) for combo in held_out_combos(args.count) for seed in args.seeds]
    results = {"model": "ditserve demo (FLUX architecture, 6 blocks), CPU float32", "images": len(cases),
               "seeds": args.seeds, "blocks": len(base.blocks), "runs": []}
    for steps in args.steps:
        engine.pipeline.dit = base
        ref_images, ref_facts, ref_s = run_config(gen, cases, steps)
        results["runs"].append({"steps": steps, "config": "uncached", "skipped": 0.0, "accuracy": accuracy(ref_facts),
                                "psnr_mean": None, "psnr_min": None, "identical": len(cases), "s_per_image": ref_s})
        log.info("%d steps uncached: facts %.1f%%", steps, 100 * accuracy(ref_facts))
        for label, keys in CONFIGS:
            if args.only and not any(part in label for part in args.only):
                continue
            engine.pipeline.dit = apply_cache(base, CacheConfig.from_mapping(keys))
            images, facts, per_image = run_config(gen, cases, steps)
            cache = step_cache(engine.pipeline.dit)
            totals = cache.totals
            values = [psnr(a, b) for a, b in zip(images, ref_images)]
            row = {"steps": steps, "config": label, "keys": keys, "skipped": totals.skipped / totals.forwards,
                   "kept_blocks": cache.policy.fn + cache.policy.bn,
                   "accuracy": accuracy(facts), "psnr_mean": float(np.mean(values)), "psnr_min": float(np.min(values)),
                   "identical": sum(v == IDENTICAL_DB for v in values), "s_per_image": per_image}
            results["runs"].append(row)
            log.info("%d steps %-30s skipped %5.1f%%  facts %5.1f%%  PSNR mean %.1f min %.1f dB", steps, label,
                     100 * row["skipped"], 100 * row["accuracy"], row["psnr_mean"], row["psnr_min"])
        engine.pipeline.dit = base
    return results


def annotate(results: dict) -> None:
    """Add each run's share of block evaluations saved: a skipped forward still runs its probe (fn)
    and last (bn) blocks, which on the 6-block demo is a far larger share than on FLUX.1 (57 blocks)."""
    blocks = results["blocks"]
    for r in results["runs"]:
        r["blocks_saved"] = r["skipped"] * (blocks - r.get("kept_blocks", blocks)) / blocks


def table(results: dict) -> str:
    """The README's markdown table."""
    lines = ["| steps | method | forwards skipped | block work saved | facts (Δ vs uncached) | PSNR mean / min (dB) |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    base = {r["steps"]: r["accuracy"] for r in results["runs"] if r["config"] == "uncached"}
    for r in results["runs"]:
        if r["config"] == "uncached":
            lines.append(f"| {r['steps']} | uncached | 0% | 0% | {100 * r['accuracy']:.1f}% | — |")
            continue
        delta = 100 * (r["accuracy"] - base[r["steps"]])
        lines.append(f"| {r['steps']} | {r['config']} | {100 * r['skipped']:.0f}% | {100 * r['blocks_saved']:.0f}% "
                     f"| {100 * r['accuracy']:.1f}% ({delta:+.1f}) | {r['psnr_mean']:.1f} / {r['psnr_min']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--count", type=int, default=None, help="held-out combos (default: all 48)")
    p.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="+", default=None, metavar="TEXT", help="only the configs whose label contains one")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cache_quality_demo_cpu.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("ditserve", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    results = measure(args)
    annotate(results)
    results["table"] = table(results)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(results["table"])  # noqa: T201 - the command's output
    return 0


if __name__ == "__main__":
    sys.exit(main())
