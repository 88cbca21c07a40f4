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
