"""What the parallel engine costs at degree 1 (one GPU): the same generation in this process
(`Engine`) and through the executor with a one-rank group (`ParallelEngine`: the rank process, the
batch sent over the socket, the per-step continue/cancel decision over the control group, the
outputs sent back), side by side on one GPU, same folder, request and seed.

The folder is a Wan 2.1 T2V checkpoint whose transformer has Wan2.1-1.3B's real size (random
weights; 832x480x81 -> 32,760 tokens) while the text encoder and VAE are the tiny test ones: the
DiT steps are what a request spends its time on, and what the executor wraps.

With `--replicas K`, also the throughput of replicas: `--requests M` submitted at once (each its own
batch) to the one-rank group and to K one-rank replicas on K GPUs; requests a second and the ratio.

    python benchmarks/bench_parallel_overhead.py [--steps 10] [--reps 3] [--replicas 2 --requests 4] \
        [--out benchmarks/results/parallel_overhead_h200.json]
    python benchmarks/bench_parallel_overhead.py --tiny     # CPU smoke run (tiny DiT, gloo)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ditserve.api import GenerationRequest  # noqa: E402
from ditserve.config import EngineConfig, ModelConfig, ParallelConfig  # noqa: E402
from ditserve.runtime.engine import Engine  # noqa: E402
from ditserve.runtime.executor import ParallelEngine  # noqa: E402
from tests.tiny.wan import TEXT_DIM, Z_21, build_tiny_wan  # noqa: E402

log = logging.getLogger("bench_parallel_overhead")


def build_folder(path: Path, tiny: bool) -> Path:
    """A Wan T2V folder; unless `tiny`, its transformer has Wan2.1-1.3B's size (text width and latent
    channels those of the tiny encoder and VAE)."""
    build_tiny_wan(path, "t2v")
    if not tiny:
        from diffusers import WanTransformer3DModel

        arch = dict(json.loads((ROOT / "ditserve/bench/architectures.json").read_text())["wan2.1-t2v-1.3b"]
                    ["transformer"])
        arch.pop("cls")
        arch.update(text_dim=TEXT_DIM, in_channels=Z_21, out_channels=Z_21)
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising 1.4B on the CPU is slow
            model = WanTransformer3DModel(**arch).to(torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        model.save_pretrained(path / "transformer")
    return path


def time_engine(engine, request: GenerationRequest, reps: int) -> tuple[list[float], np.ndarray]:
    engine.generate(request)  # warm-up
    times, out = [], None
    for _ in range(reps):
        start = time.perf_counter()
        out = engine.generate(request)
        times.append(time.perf_counter() - start)
    return times, out.videos[0]


def throughput(engine, request: GenerationRequest, count: int, replicas: int) -> float:
    """Requests a second with `count` requests submitted at once, one thread each (each its own batch:
    the engine hands it to whichever replica is idle), after one warm-up request per replica."""
    with ThreadPoolExecutor(max(count, replicas)) as pool:
        list(pool.map(engine.generate, [request] * replicas))
        start = time.perf_counter()
        list(pool.map(engine.generate, [request] * count))
        return count / (time.perf_counter() - start)


def commit() -> str:
    if os.environ.get("DITSERVE_COMMIT"):  # the device's copy of the checkout may carry another .git
        return os.environ["DITSERVE_COMMIT"]
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--replicas", type=int, default=0, help="also measure the throughput of this many replicas")
    p.add_argument("--requests", type=int, default=4, help="requests submitted at once for the throughput")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny DiT, small video, gloo")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device, dtype = ("cpu", "float32") if args.tiny else ("cuda", "bfloat16")
    size = dict(height=48, width=80, num_frames=9) if args.tiny else dict(height=480, width=832, num_frames=81)
    request = GenerationRequest(prompt="a cat walks on the grass", seed=0, num_inference_steps=args.steps, **size)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(Path(tmp) / "wan", args.tiny)
        model = ModelConfig(str(folder), device, dtype)
        local = Engine.from_config(EngineConfig(model))
        rows["in_process_s"], ours = time_engine(local, request, args.reps)
        del local
        if device == "cuda":
            torch.cuda.empty_cache()
        group = ParallelEngine.start(EngineConfig(model, parallel=ParallelConfig(num_gpus=1)))
        try:
            rows["executor_s"], theirs = time_engine(group, request, args.reps)
            if args.replicas > 1:
                rows["throughput_1_rps"] = throughput(group, request, args.requests, 1)
        finally:
            group.close()
        if args.replicas > 1:
            k = args.replicas
            group = ParallelEngine.start(EngineConfig(model, parallel=ParallelConfig(num_gpus=k, num_replicas=k)))
            try:
                rows[f"throughput_{k}_rps"] = throughput(group, request, args.requests, k)
                rows["replica_batches"] = [e.batches for e in group.executors]
            finally:
                group.close()
            rows[f"throughput_{k}_vs_1"] = rows[f"throughput_{k}_rps"] / rows["throughput_1_rps"]
    a, b = statistics.median(rows["in_process_s"]), statistics.median(rows["executor_s"])
    diff = int(np.abs(ours.astype(int) - theirs.astype(int)).max())
    result = {
        "model": "wan2.1-t2v-1.3b DiT (random), tiny UMT5 + VAE" if not args.tiny else "tiny wan",
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "steps": args.steps,
        "size": f"{size['width']}x{size['height']}x{size['num_frames']}", "reps": args.reps,
        "requests": args.requests if args.replicas > 1 else None, **rows,
        "in_process_median_s": a, "executor_median_s": b, "overhead": b / a - 1,
        "per_step_overhead_ms": (b - a) / args.steps * 1e3, "max_pixel_diff": diff, "commit": commit(),
    }
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if diff <= 1 else 1  # the guard: both paths give the same video


if __name__ == "__main__":
    sys.exit(main())
