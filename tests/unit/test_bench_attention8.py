"""The attention kernel bench (a GPU script) times the other kernels beside cuDNN and fp8: on the CPU,
SDPA pinned to its flash kernel runs and matches SDPA, and a kernel that refuses records its error."""

import importlib
import sys
from pathlib import Path

import pytest
import torch
from tiny.bench import cpu_time

BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")


@pytest.fixture
def bench(monkeypatch):
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    module = importlib.import_module("bench_attention8")
    monkeypatch.setattr(module, "median_time", cpu_time)
    return module


def test_other_kernels_are_timed_and_checked(bench):
    gen = torch.Generator().manual_seed(0)
    shape = (1, 64, 2, 32)
    others = bench.measure_others(shape, 4 * 2 * 64 * 64 * 32 / 1e12, gen, device="cpu")
    assert set(others) == {"sdpa_flash", "sdpa_efficient"}  # sage / fa3: CUDA only
    flash = others["sdpa_flash"]
    assert flash["ms"] > 0 and flash["tflops"] > 0 and flash["rel_l2_dit_like"] < 1e-2
    for row in others.values():
        assert ("error" in row) != ("ms" in row)  # timed, or the refusal recorded
