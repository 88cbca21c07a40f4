"""Timing, floors and result rows shared by the benchmarks."""

from __future__ import annotations

import datetime
import gc
import json
import logging
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import torch
from torch import nn

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class StepCase:
    """One family's DiT step as `compare_step` runs it: how to build the pair of models (same seed,
    same weights on every call), run each on the case's inputs, probe a few blocks' updates, and
    compile diffusers' side; the step's FLOPs and the guards."""

    build: Callable[[], tuple[nn.Module, nn.Module]]  # -> (diffusers, ours)
    run_ours: Callable[[nn.Module], torch.Tensor]  # our DiT, eager or accelerated, on the inputs
    run_ref: Callable[[nn.Module], torch.Tensor]
    block_updates: Callable[[nn.Module, nn.Module], dict[str, float]]  # (diffusers, ours) -> rel L2 per block
    compile_ref: Callable[[nn.Module], None]
    flops: float
    guard: float = 1e-2  # bf16 step and eager block updates vs diffusers
    fast_block_guard: float = 2e-2  # compiled bf16 blocks round elsewhere than eager ones
    fp8_guard: float = 3e-2
    eager_timing: tuple[int, int] = (3, 10)  # warm-up calls, timed calls
    fast_timing: tuple[int, int] = (3, 10)


def compare_step(case: StepCase, row: dict, device: str, quantization: str | None = None, compare: bool = True,
                 compiled: bool = True) -> dict:
    """Fill `row`: ditserve eager and compiled (and compiled FP8 with `quantization="fp8"`) vs diffusers
    eager and compiled, on the same weights and inputs, with the rel-L2 guards and the floors."""
    from ditserve.accel import accelerate_dit
    from ditserve.config import AccelConfig

    flops = case.flops
    row["step_tflop"] = flops / 1e12
    row["floor_step_s"] = flops / (MATMUL_TFLOPS["bfloat16"] * 1e12)
    ref, ours = case.build()
    expected = case.run_ref(ref)
    row["ditserve_eager_step_s"] = median_time(lambda: case.run_ours(ours), *case.eager_timing)
    row["rel_l2_eager"] = rel_l2(case.run_ours(ours), expected)
    row["rel_l2_block_update_eager"] = case.block_updates(ref, ours)
    row["guard_ok"] = max(row["rel_l2_eager"], *row["rel_l2_block_update_eager"].values()) <= case.guard
    if compare:
        row["diffusers_eager_step_s"] = median_time(lambda: case.run_ref(ref), *case.eager_timing)
        row["speedup_vs_diffusers_eager"] = row["diffusers_eager_step_s"] / row["ditserve_eager_step_s"]
    log.info("eager: %s", row)
    if not compiled:
        return row

    if device == "cuda":
        row["sustained_bf16_tflops"] = sustained_matmul_tflops("bfloat16")
        row["sustained_floor_step_s"] = flops / (row["sustained_bf16_tflops"] * 1e12)
    fast = accelerate_dit(ours, AccelConfig(compile=True), torch.device(device))
    row["ditserve_step_s"] = median_time(lambda: case.run_ours(fast), *case.fast_timing)
    row["rel_l2_vs_diffusers"] = rel_l2(case.run_ours(fast), expected)
    row["rel_l2_block_update"] = case.block_updates(ref, fast)
    row["guard_ok"] = (row["guard_ok"] and row["rel_l2_vs_diffusers"] <= case.guard
                       and max(row["rel_l2_block_update"].values()) <= case.fast_block_guard)
    row["fraction_of_floor"] = row["floor_step_s"] / row["ditserve_step_s"]
    if compare:
        row["speedup_vs_diffusers_eager"] = row["diffusers_eager_step_s"] / row["ditserve_step_s"]
        case.compile_ref(ref)
        row["diffusers_compiled_step_s"] = median_time(lambda: case.run_ref(ref), *case.fast_timing)
        row["speedup_vs_diffusers_compiled"] = row["diffusers_compiled_step_s"] / row["ditserve_step_s"]
    if quantization == "fp8":
        del ref, ours, fast
        gc.collect()
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        ref8, fresh = case.build()  # same seed: the same weights
        fast8 = accelerate_dit(fresh, AccelConfig(compile=True, quantization="fp8"), torch.device(device))
        row["ditserve_fp8_step_s"] = median_time(lambda: case.run_ours(fast8), *case.fast_timing)
        row["fp8_rel_l2_vs_diffusers_bf16"] = rel_l2(case.run_ours(fast8), expected)
        row["fp8_rel_l2_block_update"] = case.block_updates(ref8, fast8)
        row["fp8_guard_ok"] = max(row["fp8_rel_l2_vs_diffusers_bf16"],
                                  *row["fp8_rel_l2_block_update"].values()) <= case.fp8_guard
        row["fp8_floor_step_s"] = flops / (MATMUL_TFLOPS["fp8"] * 1e12)
        row["fp8_speedup_vs_diffusers_compiled"] = row.get("diffusers_compiled_step_s", float("nan")) / \
            row["ditserve_fp8_step_s"]
    log.info("%s", row)
    return row
