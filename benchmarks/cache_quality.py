"""Step-caching and FP8 quality on the trained demo models (the only trained models here), on the CPU.

For each method and threshold, at 20 and 50 steps: the share of DiT forwards that reused cached work,
the facts accuracy of the held-out prompts x seeds (the demo's checker) against the uncached run, and
the PSNR of every image (every clip's frames, with `--video`) against the uncached one of the same
prompt and seed. `--fp8` adds a row with the DiT's block linears in e4m3 (`accel/fp8.py` through
torch._scaled_mm, which runs on the CPU too; at the demos' width every block linear qualifies);
`--fp8-attention` one with the "fp8" attention backend's numerics emulated in float32 (its cuDNN
kernel needs a Hopper GPU; tests/gpu checks the emulation against it), and with both one with the two.
Requests run one at a time, as a lone request would.

    python benchmarks/cache_quality.py [--seeds 0 1 2] [--count 48] [--steps 20 50] [--fp8] \
        [--out benchmarks/results/cache_quality_demo_cpu.json]
    python benchmarks/cache_quality.py --video [--model-path DIR] --seeds 0 --steps 20 --fp8 \
        --out benchmarks/results/cache_quality_video_demo_cpu.json

PSNR is per image (per clip) on uint8 RGB; one equal to the uncached one counts as 100 dB in the mean
(`identical` says how many were). For the video demo, `accuracy` is the per-frame facts (background,
color, shape) and `direction` the motion read off each clip.
"""

from __future__ import annotations

import argparse
import copy
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
from ditserve.accel.attention import apply_attention, backend_sites  # noqa: E402
from ditserve.accel.attention8 import fp8_attention_emulated  # noqa: E402
from ditserve.accel.cache import apply_cache, step_cache  # noqa: E402
from ditserve.accel.fp8 import apply_fp8  # noqa: E402
from ditserve.config import EngineConfig, ModelConfig  # noqa: E402
from ditserve.config.engine import CacheConfig  # noqa: E402
from ditserve.runtime.engine import Engine  # noqa: E402
from ditserve.runtime.generator import Generator  # noqa: E402
from training.demo import checker as image_checker  # noqa: E402
from training.demo import evaluate as image_eval  # noqa: E402
from training.video_demo import checker as video_checker  # noqa: E402
from training.video_demo import evaluate as video_eval  # noqa: E402

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


# Wan's step caches on the video demo's 6 blocks (TeaCache has fits only for Wan's published sizes)
VIDEO_CONFIGS = [
    ("first-block 0.05", dict(method="first-block", threshold=0.05)),
    ("first-block 0.10", dict(method="first-block", threshold=0.10)),
    ("first-block 0.10 +TS1", dict(method="first-block", threshold=0.10, taylorseer_order=1)),
    ("first-block 0.15 +TS1", dict(method="first-block", threshold=0.15, taylorseer_order=1)),
    ("dual-block F1B0 0.15 w3 +TS2", dict(method="dual-block", threshold=0.15, warmup_steps=3, taylorseer_order=2)),
    ("dual-block F1B1 0.15 +TS1", dict(method="dual-block", threshold=0.15, bn=1, taylorseer_order=1)),
    ("dual-block F1B1 0.25 +TS1", dict(method="dual-block", threshold=0.25, bn=1, taylorseer_order=1)),
    # with classifier-free guidance (the demo's default since 2026-12-05) the first block's residual moves more
    ("first-block 0.20 +TS1", dict(method="first-block", threshold=0.20, taylorseer_order=1)),
    ("first-block 0.30 +TS1", dict(method="first-block", threshold=0.30, taylorseer_order=1)),
    ("dual-block F1B1 0.35 +TS1", dict(method="dual-block", threshold=0.35, bn=1, taylorseer_order=1)),
    ("dual-block F1B1 0.50 +TS1", dict(method="dual-block", threshold=0.50, bn=1, taylorseer_order=1)),
]
FP8 = "fp8 (block linears)"
FP8_ATTENTION = "fp8 attention (emulated)"
FP8_BOTH = "fp8 linears + fp8 attention (emulated)"


class Subject:
    """A demo model with its held-out cases, how a request's output becomes an array, and its checker."""

    def __init__(self, video: bool, path: Path | None):
        self.video = video
        self.path = path or (demo.video_model_path() if video else demo.model_path())
        if self.path is None:
            raise SystemExit(f"the {'video ' if video else ''}demo model is not installed; pass --model-path")
        self.configs = VIDEO_CONFIGS if video else CONFIGS
        self.label = ("ditserve video demo (Wan 2.1 architecture, 6 blocks)" if video
                      else "ditserve demo (FLUX architecture, 6 blocks)") + ", CPU float32"

    def cases(self, count: int | None, seeds: list[int]) -> list:
        combos = (video_eval if self.video else image_eval).held_out_combos(count)
        return [(combo, seed) for combo in combos for seed in seeds]

    def output(self, gen: Generator, combo, seed: int, steps: int) -> np.ndarray:
        out = gen.generate(combo.caption, seed=seed, num_inference_steps=steps)
        return np.asarray(out.videos[0] if self.video else out.images[0])

    def check(self, array: np.ndarray, combo) -> dict:
        return video_checker.check_clip(array, combo) if self.video else image_checker.check(array, combo)

    def scores(self, facts: list[dict]) -> dict:
        if self.video:
            return {"accuracy": video_checker.fact_accuracy(facts), "direction": video_checker.direction_accuracy(facts)}
        values = [ok for r in facts for ok in r.values()]
        return {"accuracy": sum(values) / len(values)}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return IDENTICAL_DB if mse == 0 else min(IDENTICAL_DB, 10 * math.log10(255.0 ** 2 / mse))


def run_config(subject: Subject, gen: Generator, cases, steps: int) -> tuple[list[np.ndarray], list[dict], float]:
    outputs, facts = [], []
    start = time.perf_counter()
    for combo, seed in cases:
        array = subject.output(gen, combo, seed, steps)
        outputs.append(array)
        facts.append(subject.check(array, combo))
    return outputs, facts, (time.perf_counter() - start) / len(cases)


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    subject = Subject(args.video, args.model_path)
    engine = Engine.from_config(EngineConfig(ModelConfig(str(subject.path), "cpu", "float32")))
    base, gen = engine.pipeline.dit, Generator(engine)
    fp8 = apply_fp8(copy.deepcopy(base), min_features=1) if args.fp8 else None  # a copy: it swaps in place
    fixed = [(FP8, fp8)] if fp8 is not None else []  # (label, DiT) rows without a cache
    if args.fp8_attention:
        fp8_sites = backend_sites(base.plan, "fp8")  # as accelerate_dit sets them: Wan's cross-attention stays SDPA
        fixed.append((FP8_ATTENTION, apply_attention(copy.deepcopy(base), fp8_attention_emulated, fp8_sites)))
        if fp8 is not None:
            fixed.append((FP8_BOTH, apply_attention(copy.deepcopy(fp8), fp8_attention_emulated, fp8_sites)))
    cases = subject.cases(args.count, args.seeds)
    results = {"model": subject.label, "images": len(cases), "seeds": args.seeds, "blocks": len(base.blocks),
               "runs": []}
    for steps in args.steps:
        engine.pipeline.dit = base
        ref_outputs, ref_facts, ref_s = run_config(subject, gen, cases, steps)
        results["runs"].append({"steps": steps, "config": "uncached", "skipped": 0.0, **subject.scores(ref_facts),
                                "psnr_mean": None, "psnr_min": None, "identical": len(cases), "s_per_image": ref_s})
        log.info("%d steps uncached: %s", steps, subject.scores(ref_facts))
        variants = [(label, keys, None) for label, keys in subject.configs
                    if not args.only or any(part in label for part in args.only)]
        for label, keys, dit in variants + [(label, None, dit) for label, dit in fixed]:
            engine.pipeline.dit = dit if keys is None else apply_cache(base, CacheConfig.from_mapping(keys))
            outputs, facts, per_image = run_config(subject, gen, cases, steps)
            values = [psnr(a, b) for a, b in zip(outputs, ref_outputs)]
            row = {"steps": steps, "config": label, "keys": keys, "skipped": 0.0, "kept_blocks": len(base.blocks),
                   **subject.scores(facts), "psnr_mean": float(np.mean(values)), "psnr_min": float(np.min(values)),
                   "identical": sum(v == IDENTICAL_DB for v in values), "s_per_image": per_image}
            if keys is not None:
                cache = step_cache(engine.pipeline.dit)
                row["skipped"] = cache.totals.skipped / cache.totals.forwards
                row["kept_blocks"] = cache.policy.fn + cache.policy.bn
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
    """The README's markdown table (a direction column for the video demo)."""
    video = any("direction" in r for r in results["runs"])
    lines = ["| steps | method | forwards skipped | block work saved | facts (Δ vs uncached) | "
             + ("direction (Δ) | " if video else "") + "PSNR mean / min (dB) |",
             "| ---: | --- | ---: | ---: | ---: | " + ("---: | " if video else "") + "---: |"]
    base = {r["steps"]: r for r in results["runs"] if r["config"] == "uncached"}

    def score(r: dict, key: str) -> str:
        if r["config"] == "uncached":
            return f"{100 * r[key]:.1f}%"
        return f"{100 * r[key]:.1f}% ({100 * (r[key] - base[r['steps']][key]):+.1f})"

    for r in results["runs"]:
        first = r["config"] == "uncached"
        cells = [str(r["steps"]), r["config"], "0%" if first else f"{100 * r['skipped']:.0f}%",
                 "0%" if first else f"{100 * r['blocks_saved']:.0f}%", score(r, "accuracy")]
        cells += [score(r, "direction")] if video else []
        cells += ["—" if first else f"{r['psnr_mean']:.1f} / {r['psnr_min']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--count", type=int, default=None, help="held-out combos (default: all 48)")
    p.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="+", default=None, metavar="TEXT", help="only the configs whose label contains one")
    p.add_argument("--video", action="store_true", help="the video demo (Wan architecture) instead of the image demo")
    p.add_argument("--model-path", type=Path, default=None, help="a demo model folder (default: the bundled one)")
    p.add_argument("--fp8", action="store_true", help="add a row with the DiT's block linears in fp8")
    p.add_argument("--fp8-attention", action="store_true",
                   help="add a row with the 'fp8' attention backend's numerics emulated in float32 "
                        "(accel/attention8.py), and with --fp8 one with both")
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
