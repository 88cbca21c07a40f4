"""Running a GPU step bench on the CPU: a shrunken architecture table and a plain wall-clock timer."""

from __future__ import annotations

import time


def cpu_time(fn, warmup: int = 1, reps: int = 2) -> float:
    """One warm-up call, then one timed call (the benches' CUDA-event timer needs a GPU)."""
    fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def shrink(monkeypatch, bench_module, table: dict) -> None:
    """Make `bench_module` build from `table` and time with `cpu_time` (its own timer, if it has one,
    and the shared `compare_step`'s)."""
    from ditserve.bench import common

    monkeypatch.setattr(bench_module, "architectures", lambda: table)
    monkeypatch.setattr(common, "median_time", cpu_time)
    if hasattr(bench_module, "median_time"):
        monkeypatch.setattr(bench_module, "median_time", cpu_time)


def stand_in_accel(monkeypatch, spoil=None) -> None:
    """`accelerate_dit` as the benches call it, on the CPU and without compiling: fp8 linears (e4m3 through
    `torch._scaled_mm`, which runs on the CPU, at every size) where fp8 is asked for, the fp8 attention
    backend's numerics emulated in float32 where `attention="fp8"` is; `spoil(dit)`, if given, then breaks
    the accelerated DiT, as a wrong fast path would."""
    import ditserve.accel
    from ditserve.accel.attention import apply_attention, backend_sites
    from ditserve.accel.attention8 import fp8_attention_emulated
    from ditserve.accel.fp8 import apply_fp8

    def accelerate(dit, accel, device):
        if accel.quantization == "fp8":
            apply_fp8(dit, min_features=0)
        if accel.attention == "fp8":
            apply_attention(dit, fp8_attention_emulated, backend_sites(dit.plan, "fp8"))
        if spoil is not None:
            spoil(dit)
        return dit

    monkeypatch.setattr(ditserve.accel, "accelerate_dit", accelerate)


def unnormed_qkv(parts, pe, heads):
    """A broken `qkv_op` (FLUX, HunyuanVideo): QK-norm left out."""
    from ditserve.models.common.mmdit import norm_rope_qkv

    return norm_rope_qkv([(qkv, lambda q, k: (q, k)) for qkv, _ in parts], pe, heads)


def fp8_biases_lost(dit) -> None:
    """A broken fp8 path: the fp8 linears drop their biases."""
    from ditserve.accel.fp8 import FP8Linear

    for module in dit.modules():
        if isinstance(module, FP8Linear):
            module.bias = None
