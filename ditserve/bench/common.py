"""Timing, floors and result rows shared by the benchmarks."""

from __future__ import annotations

import datetime
import json
import statistics
import subprocess
from importlib import resources

import torch

# Measured on one H200 (../shared/GPU.md): bf16 dense matmul 8192^3, fp8 via torch._scaled_mm.
MATMUL_TFLOPS = {"bfloat16": 790.0, "fp8": 1437.0}


def architectures() -> dict:
    return json.loads(resources.files("ditserve.bench").joinpath("architectures.json").read_text())


def arch_kwargs(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "cls"}


def median_time(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median wall time of `fn()` in seconds, timed with CUDA events after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def sustained_matmul_tflops(dtype: str = "bfloat16", seconds: float = 5.0, n: int = 8192) -> float:
    """Median rate of n^3 products run back to back for `seconds`. The H200 here is capped at
    700 W: under a sustained load its SM clock drops from 1980 to ≈ 1450-1600 MHz, so this is the
    rate a whole denoising loop can expect (≈ 660 TFLOP/s bf16, ≈ 1200 fp8), below the burst rate."""
    import time

    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    if dtype == "fp8":
        a, b = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")

        def fn():
            return torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    else:
        def fn():
            return a @ b
    rates, end_at = [], time.time() + seconds
    while time.time() < end_at:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            fn()
        end.record()
        end.synchronize()
        rates.append(10 * 2 * n**3 / (start.elapsed_time(end) / 1000) / 1e12)
    return statistics.median(rates[len(rates) // 2:])


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def commit() -> str:
    from ditserve.config import env

    if env.commit_override():
        return env.commit_override()
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def base_row(model: str, dtype: str, shape: str) -> dict:
    return {
        "model": model,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "dtype": dtype,
        "shape": shape,
        "torch": torch.__version__,
        "commit": commit(),
        "date": datetime.date.today().isoformat(),
    }


def random_pair(ref_cls, arch: dict, ours_cls, cfg, key_map: dict, device, dtype: torch.dtype,
                weight_scale: float = 0.5):
    """A diffusers model with random weights (scaled down so deep stacks stay finite) and ours,
    built on meta and filled with the same values through the key map."""
    from ditserve.models.common.loading import assign_mapped

    torch.manual_seed(0)
    with torch.device(device):
        ref = ref_cls(**arch).to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(weight_scale)
    ref.eval().requires_grad_(False)
    with torch.device("meta"):
        ours = ours_cls(cfg)
    sd = ref.state_dict()
    assign_mapped(ours, key_map, set(sd), sd.__getitem__, device, dtype, where="diffusers model")
    return ref, ours.eval()
