"""Timing, floors and result rows shared by the benchmarks."""

from __future__ import annotations

import copy
import datetime
import gc
import json
import logging
import statistics
import subprocess
import time
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


def timed_output(fn, warmup: int, reps: int) -> tuple[float, object]:
    """`median_time(fn, warmup, reps)` and the output of the last timed call: the output the guards judge
    costs no call of its own (at HunyuanVideo's 119k tokens a call is ≈ 20 s)."""
    last = [None]

    def call():
        last[0] = fn()

    return median_time(call, warmup, reps), last[0]


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


def wall_time(fn, reps: int) -> tuple[float, object]:
    """Median wall time of `reps` calls of `fn()` (the device synchronised around each) and the last
    call's output: for whole generations, where a host clock is what a user waits on."""
    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    times, out = [], None
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def psnr(a, b) -> float:
    """PSNR in dB of two uint8 images or videos (numpy arrays of one shape); inf when equal."""
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


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


# The block probe feeds the residual streams at 1/100 of their size: the blocks normalise them, so the update
# is the same, and the update keeps more of its bits through the bf16 residual sums. With random weights
# (small adaLN gates) the update stays below even the scaled stream, so diffusers' own bf16 block is still
# 1.4-2.6e-2 off its float32 self on the H200 (FLUX.1-dev, SD3.5-Large, HunyuanVideo widths; ≈ 5e-3 in the
# tiny CPU models): two bf16 blocks that round in different places (eager vs compiled) then differ by both
# errors together, 3.1e-2 for SD3.5-Large with right math (diffusers' 2.6e-2 and ours compiled 1.85e-2, each
# against float32).
PROBE_SCALE = 0.01
# So the compiled blocks are judged against diffusers' block run in float32 (the same weights and inputs,
# upcast): within `fast_block_guard` or FLOOR_FACTOR times diffusers' own bf16 error there (the probe's
# `floor`), whichever is larger. Measured on the H200 (2-block models at real width and tokens): compiled
# vs float32 0.71x the floor on SD3.5-Large (1.85e-2 vs 2.60e-2), 0.72x and 0.96x on FLUX's double and single
# blocks. A wrong block (no QK-norm, wrong positions, another block's weights) is off by more (tests).
FLOOR_FACTOR = 1.5
# fp8 (e4m3, per-row scales) puts ≈ 5 % on every projection's output, a block's update is off its float32
# self by 5.1e-2 (SD3.5-Large) and 5.3-5.4e-2 (FLUX) on the H200, 1.5-4.7e-2 in the tiny CPU models (fp8
# through torch._scaled_mm on the CPU): far above the bf16 bounds, so fp8 blocks get their own bound. It
# catches a broken fp8 linear (a lost bias: ≥ 0.6); the block math inside is what the bf16 probes judge.
# The whole fp8 step keeps the issues' bound, `fp8_guard` (3e-2 vs diffusers' bf16 step).
FP8_BLOCK_GUARD = 8e-2


def cast_floats(obj, dtype: torch.dtype):
    """`obj` (a tensor, or tuples/lists/dicts of them) with its bf16/fp16 tensors in `dtype`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.dtype in (torch.bfloat16, torch.float16) else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(cast_floats(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: cast_floats(v, dtype) for k, v in obj.items()}
    return obj


@dataclass
class ProbedBlock:
    """One block the probe compares: diffusers' block, how to run it on the probe's inputs, and how to run
    ours (from our DiT, eager or accelerated) on the same inputs. Both return the probed stream after it."""

    ref: nn.Module
    run_ref: Callable[..., torch.Tensor]  # (block, *ref_inputs) -> stream out
    run_ours: Callable[[nn.Module], torch.Tensor]  # (our DiT) -> stream out


class UpdateProbe:
    """The block-update probe: with random weights the whole-model output barely depends on the blocks, so
    a few blocks' updates (output minus input of the probed stream) are compared, ours vs diffusers', from
    the same embedded inputs (streams at `PROBE_SCALE`). diffusers' updates are computed once, in bf16 as
    its model runs and in float32 (a float32 copy of the block, the same inputs upcast): `floor` is
    diffusers' own bf16 error on each update, the noise any bf16 block carries."""

    def __init__(self, stream: torch.Tensor, ref_inputs: tuple, blocks: dict[str, ProbedBlock]):
        self.stream = stream
        self.run_ours = {name: b.run_ours for name, b in blocks.items()}
        self.bf16, self.fp32 = {}, {}
        for name, b in blocks.items():
            self.bf16[name] = b.run_ref(b.ref, *ref_inputs)
            ref32 = copy.deepcopy(b.ref).float()
            self.fp32[name] = b.run_ref(ref32, *cast_floats(ref_inputs, torch.float32))
            del ref32
        self.floor = {name: self._rel(self.bf16[name], self.fp32[name]) for name in blocks}

    def _rel(self, out: torch.Tensor, expected: torch.Tensor) -> float:
        stream = self.stream.float()
        return rel_l2(out.float() - stream, expected.float() - stream)

    def compare(self, dit: nn.Module) -> tuple[dict[str, float], dict[str, float]]:
        """rel L2 of each probed block's update, ours (`dit`) vs diffusers' in bf16 and vs float32."""
        vs_bf16, vs_fp32 = {}, {}
        for name, run in self.run_ours.items():
            out = run(dit)
            vs_bf16[name], vs_fp32[name] = self._rel(out, self.bf16[name]), self._rel(out, self.fp32[name])
        return vs_bf16, vs_fp32

    def fast_bound(self, guard: float) -> dict[str, float]:
        """What a compiled bf16 block may be off from float32: `FLOOR_FACTOR`x the floor, or `guard`."""
        return {name: max(guard, FLOOR_FACTOR * f) for name, f in self.floor.items()}


@dataclass(frozen=True)
class StepCase:
    """One family's DiT step as `compare_step` runs it: how to build the pair of models (same seed,
    same weights on every call), run each on the case's inputs, probe a few blocks' updates, and
    compile diffusers' side; the step's FLOPs and the guards."""

    build: Callable[[], tuple[nn.Module, nn.Module]]  # -> (diffusers, ours)
    run_ours: Callable[[nn.Module], torch.Tensor]  # our DiT, eager or accelerated, on the inputs
    run_ref: Callable[[nn.Module], torch.Tensor]
    block_probe: Callable[[nn.Module, nn.Module], UpdateProbe]  # (diffusers, our eager DiT) -> the probe
    compile_ref: Callable[[nn.Module], None]
    flops: float
    guard: float = 1e-2  # bf16 step, and eager block updates vs diffusers' bf16 blocks
    fast_block_guard: float = 1e-2  # compiled blocks vs diffusers' float32 blocks (or FLOOR_FACTOR x floor)
    fp8_guard: float = 3e-2  # the fp8 step vs diffusers' bf16 step
    fp8_block_guard: float = FP8_BLOCK_GUARD  # fp8 blocks vs diffusers' float32 blocks
    eager_timing: tuple[int, int] = (3, 10)  # warm-up calls, timed calls
    fast_timing: tuple[int, int] = (3, 10)


def compare_step(case: StepCase, row: dict, device: str, quantization: str | None = None, compare: bool = True,
                 compiled: bool = True, attention: str = "auto", fp8_alone: bool = True) -> dict:
    """Fill `row`: ditserve eager and compiled (and compiled FP8 with `quantization="fp8"`) vs diffusers
    eager and compiled, on the same weights and inputs, with the rel-L2 guards and the floors.

    Block probes (`UpdateProbe`): `rel_l2_block_update*` against diffusers' bf16 blocks (eager: ≤ `guard`;
    the same ops, nearly the same bits), `*_fp32` against its float32 blocks, which judge the compiled
    (`fast_block_bound`) and fp8 (`fp8_block_guard`) blocks; `block_update_floor`: diffusers' own bf16
    error. With `attention` other than "auto" (e.g. "fp8"), one more compiled variant runs that attention
    backend, with fp8 linears when `quantization="fp8"` (fields `fp8_attn_*`) or bf16 ones (`attn_*`),
    judged by the fp8 step guard. `fp8_alone=False` skips the fp8-linears-only variant when that attention
    variant runs (the longest sequences, where a call's time does not allow both).

    Model calls (the guards judge the output of the last timed call): ours eager `sum(eager_timing)`;
    diffusers eager `sum(eager_timing) - 1` with `compare` (ours warmed the GPU; its last timed call is the
    reference output), else 1; ours compiled, diffusers compiled (`compare`) and ours fp8 (`fp8`)
    `sum(fast_timing)` each, where the first call also compiles (and, on CUDA, runs each segment twice more
    and captures its graph: the second call is a replay). The probe runs diffusers' probed blocks twice
    (bf16, float32) once, and ours once per variant."""
    from ditserve.accel import accelerate_dit
    from ditserve.config import AccelConfig

    flops = case.flops
    row["step_tflop"] = flops / 1e12
    row["floor_step_s"] = flops / (MATMUL_TFLOPS["bfloat16"] * 1e12)
    ref, ours = case.build()
    row["ditserve_eager_step_s"], out = timed_output(lambda: case.run_ours(ours), *case.eager_timing)
    if compare:
        warmup, reps = case.eager_timing
        row["diffusers_eager_step_s"], expected = timed_output(lambda: case.run_ref(ref), max(0, warmup - 1), reps)
        row["speedup_vs_diffusers_eager"] = row["diffusers_eager_step_s"] / row["ditserve_eager_step_s"]
    else:
        expected = case.run_ref(ref)
    row["rel_l2_eager"] = rel_l2(out, expected)
    probe = case.block_probe(ref, ours)
    row["block_update_floor"] = probe.floor
    row["rel_l2_block_update_eager"], row["rel_l2_block_update_eager_fp32"] = probe.compare(ours)
    row["guard_ok"] = max(row["rel_l2_eager"], *row["rel_l2_block_update_eager"].values()) <= case.guard
    log.info("eager: %s", row)
    if not compiled:
        return row

    if device == "cuda":
        row["sustained_bf16_tflops"] = sustained_matmul_tflops("bfloat16")
        row["sustained_floor_step_s"] = flops / (row["sustained_bf16_tflops"] * 1e12)
    fast = accelerate_dit(ours, AccelConfig(compile=True), torch.device(device))
    row["ditserve_step_s"], out = timed_output(lambda: case.run_ours(fast), *case.fast_timing)
    row["rel_l2_vs_diffusers"] = rel_l2(out, expected)
    row["rel_l2_block_update"], row["rel_l2_block_update_fp32"] = probe.compare(fast)
    row["fast_block_bound"] = probe.fast_bound(case.fast_block_guard)
    row["guard_ok"] = (row["guard_ok"] and row["rel_l2_vs_diffusers"] <= case.guard
                       and all(v <= row["fast_block_bound"][k] for k, v in row["rel_l2_block_update_fp32"].items()))
    row["fraction_of_floor"] = row["floor_step_s"] / row["ditserve_step_s"]
    if compare:
        row["speedup_vs_diffusers_eager"] = row["diffusers_eager_step_s"] / row["ditserve_step_s"]
        case.compile_ref(ref)
        row["diffusers_compiled_step_s"] = median_time(lambda: case.run_ref(ref), *case.fast_timing)
        row["speedup_vs_diffusers_compiled"] = row["diffusers_compiled_step_s"] / row["ditserve_step_s"]
    variants = [("fp8", "fp8", "auto")] if quantization == "fp8" and (fp8_alone or attention == "auto") else []
    if attention != "auto":
        variants.append(("fp8_attn" if quantization == "fp8" else "attn", quantization, attention))
    if variants:
        del ref, ours, fast
    for prefix, quant, attn in variants:
        gc.collect()
        torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()
        ref8, fresh = case.build()  # same seed: the same weights; the probe keeps diffusers' updates
        del ref8
        fast8 = accelerate_dit(fresh, AccelConfig(compile=True, quantization=quant, attention=attn),
                               torch.device(device))
        row[f"ditserve_{prefix}_step_s"], out = timed_output(lambda f=fast8: case.run_ours(f), *case.fast_timing)
        row[f"{prefix}_attention"] = attn
        row[f"{prefix}_rel_l2_vs_diffusers_bf16"] = rel_l2(out, expected)
        row[f"{prefix}_rel_l2_block_update"], row[f"{prefix}_rel_l2_block_update_fp32"] = probe.compare(fast8)
        row[f"{prefix}_guard_ok"] = (row[f"{prefix}_rel_l2_vs_diffusers_bf16"] <= case.fp8_guard
                                     and max(row[f"{prefix}_rel_l2_block_update_fp32"].values())
                                     <= case.fp8_block_guard)
        row[f"{prefix}_speedup_vs_diffusers_compiled"] = row.get("diffusers_compiled_step_s", float("nan")) / \
            row[f"ditserve_{prefix}_step_s"]
        del fresh, fast8
    if quantization == "fp8":
        row["fp8_floor_step_s"] = flops / (MATMUL_TFLOPS["fp8"] * 1e12)
    log.info("%s", row)
    return row
