"""Loopback load test for `ditserve serve`: throughput and latency percentiles per concurrency,
with and without batching.

    python benchmarks/load_server.py --tiny                    # the tiny test checkpoint, on the CPU
    python benchmarks/load_server.py --model-path DIR --device cuda --size 1024x1024 --steps 28

It starts its own servers on 127.0.0.1 (nothing leaves the machine), one per --max-batch-size,
sends a bounded number of requests at each concurrency (closed loop: each client sends its next
request when the last one returns), and writes one JSON file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from datetime import date
from pathlib import Path

import httpx
import numpy as np

log = logging.getLogger("load_server")
REPO = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"on (http://127\.0\.0\.1:\d+)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-path", help="diffusers model directory")
    src.add_argument("--tiny", action="store_true", help="build the tiny FLUX test checkpoint and use it")
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker-threads", type=int, default=1, help="torch CPU threads in the worker")
    p.add_argument("--size", default="64x64")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--max-sequence-length", type=int, default=32)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="--max-batch-size per server")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level and round (bounded)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds; each round measures every server in turn, so background load hits all alike")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/load_server_tiny_cpu.json"))
    return p.parse_args(argv)


def tiny_checkpoint(folder: Path) -> Path:
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from tiny.flux import build_tiny_flux

    return build_tiny_flux(folder / "tiny_flux", guidance_embeds=True)


@contextmanager
def server(model: Path, batch: int, args: argparse.Namespace, logs: Path):
    """`ditserve serve` on a free loopback port; yields its URL once /ready answers 200."""
    log_path = logs / f"server_batch{batch}.log"
    cmd = [sys.executable, "-m", "ditserve.cli.main", "serve", "--model-path", str(model), "--host", "127.0.0.1",
           "--port", "0", "--device", args.device, "--max-batch-size", str(batch), "--max-queue", "1024",
           "--request-timeout", str(args.timeout), "--worker-threads", str(args.worker_threads)]
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            yield wait_ready(proc, log_path)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_ready(proc: subprocess.Popen, log_path: Path, limit_s: float = 300) -> str:
    deadline, url = time.monotonic() + limit_s, None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); see {log_path}")
        url = url or (m[1] if (m := _LISTENING.search(log_path.read_text())) else None)
        if url:
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready after {limit_s:.0f} s; see {log_path}")


async def run_level(url: str, concurrency: int, count: int, body: dict, timeout: float) -> dict:
    """`count` requests from `concurrency` closed-loop clients: latencies, statuses, wall time."""
    seeds = iter(range(count))
    level = {"latencies": [], "statuses": Counter(), "batch_images": [], "wall_s": 0.0}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        async def client_loop():
            for seed in seeds:
                start = time.perf_counter()
                response = await client.post("/v1/images/generations", json={**body, "seed": seed})
                level["statuses"][response.status_code] += 1
                if response.status_code == 200:
                    level["latencies"].append(time.perf_counter() - start)
                    level["batch_images"].append(response.json()["timings"]["batch_images"])

        start = time.perf_counter()
        await asyncio.gather(*[client_loop() for _ in range(concurrency)])
        level["wall_s"] = time.perf_counter() - start
    return level


def summarize(batch: int, concurrency: int, rounds: list[dict]) -> dict:
    """All rounds of one (batch size, concurrency) pooled: ok requests over total wall time."""
    latencies = [x for r in rounds for x in r["latencies"]]
    statuses = sum((r["statuses"] for r in rounds), Counter())
    wall = sum(r["wall_s"] for r in rounds)
    p50, p90, p99 = (float(v) for v in np.percentile(latencies, [50, 90, 99]))
    return {"max_batch_size": batch, "concurrency": concurrency, "requests": sum(statuses.values()),
            "ok": statuses[200], "errors": {str(k): v for k, v in statuses.items() if k != 200},
            "wall_s": wall, "throughput_rps": statuses[200] / wall,
            "throughput_rps_by_round": [len(r["latencies"]) / r["wall_s"] for r in rounds],
            "latency_s": {"p50": p50, "p90": p90, "p99": p99, "mean": float(np.mean(latencies))},
            "mean_batch_images": float(np.mean([b for r in rounds for b in r["batch_images"]]))}


def measure(model: Path, args: argparse.Namespace, logs: Path) -> list[dict]:
    body = {"prompt": "a red fox in the snow", "size": args.size, "num_inference_steps": args.steps,
            "max_sequence_length": args.max_sequence_length}
    runs: dict[tuple[int, int], list[dict]] = {}
    with ExitStack() as stack:
        urls = {batch: stack.enter_context(server(model, batch, args, logs)) for batch in args.batch_sizes}
        for url in urls.values():
            asyncio.run(run_level(url, 2, 4, body, args.timeout))  # warm-up, not recorded
        for round_ in range(args.rounds):
            for batch, url in urls.items():
                for concurrency in args.concurrency:
                    count = max(args.requests, concurrency)
                    level = asyncio.run(run_level(url, concurrency, count, body, args.timeout))
                    runs.setdefault((batch, concurrency), []).append(level)
                    log.info("round %d, batch %d, concurrency %2d: %.2f req/s", round_ + 1, batch, concurrency,
                             len(level["latencies"]) / level["wall_s"])
    results = [summarize(b, c, rounds) for (b, c), rounds in runs.items()]
    for r in results:
        log.info("batch %d, concurrency %2d: %.2f req/s, p50 %.3f s, p90 %.3f s, p99 %.3f s, mean batch %.2f",
                 r["max_batch_size"], r["concurrency"], r["throughput_rps"], r["latency_s"]["p50"],
                 r["latency_s"]["p90"], r["latency_s"]["p99"], r["mean_batch_images"])
    return results


def batching_gain(results: list[dict], batch_sizes: list[int]) -> dict:
    """Throughput with the largest --max-batch-size over the smallest, per concurrency."""
    lo, hi = min(batch_sizes), max(batch_sizes)
    by = {(r["max_batch_size"], r["concurrency"]): r["throughput_rps"] for r in results}
    return {str(c): by[(hi, c)] / by[(lo, c)] for b, c in by if b == lo and (hi, c) in by}


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    import torch

    with tempfile.TemporaryDirectory(prefix="ditserve-load-") as tmp:
        model = tiny_checkpoint(Path(tmp)) if args.tiny else Path(args.model_path)
        load_before = os.getloadavg()
        results = measure(model, args, Path(tmp))
        load_after = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    report = {
        "benchmark": "load_server", "date": date.today().isoformat(), "commit": commit.stdout.strip(),
        "model": "tiny FLUX test checkpoint (tests/tiny/flux.py)" if args.tiny else str(args.model_path),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "device": args.device, "worker_threads": args.worker_threads,
                    "load_average_before_after": [load_before[0], load_after[0]]},
        "workload": {"size": args.size, "steps": args.steps, "max_sequence_length": args.max_sequence_length,
                     "requests_per_level_and_round": args.requests, "rounds": args.rounds, "closed_loop": True},
        "results": results,
        "batching_gain_throughput": batching_gain(results, args.batch_sizes),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s; batching gain by concurrency: %s", args.out, report["batching_gain_throughput"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
