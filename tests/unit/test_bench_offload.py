"""The offload bench (GPU) runs on the CPU at toy size: resident, layerwise (chunked and not) and budgeted
layerwise rows beside diffusers' group offload, every mode's output equal to the resident one; with `--compile`
(slow) each side compiled, the streamed compiled blocks' output equal to the compiled resident one."""

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")
ROW_KEYS = {"model", "gpu", "offload", "gpu_memory_budget_gib", "step_s", "resident_step_s",
            "diffusers_offload_step_s", "peak_mem_gib", "commit"}


def test_tiny_run_writes_rows(tmp_path):
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    bench = importlib.import_module("bench_offload")
    out = tmp_path / "offload.json"
    bench.main(["--model", "flux.1-dev", "--tiny", "--warmup", "1", "--reps", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["offload"], r["gpu_memory_budget_gib"] is not None, r["forward_chunk_size"]) for r in rows] == [
        ("none", False, None), ("layerwise", False, 4096), ("layerwise", True, 4096), ("layerwise", False, None)]
    for row in rows:
        assert ROW_KEYS <= set(row) and row["gpu"] == "cpu" and row["peak_mem_gib"] is None
        assert row["max_abs_diff_vs_resident"] == 0.0 and row["diffusers_offload_step_s"] > 0
    assert 0 < rows[2]["streamed_groups"] < rows[1]["streamed_groups"] == rows[3]["streamed_groups"] == 6
    assert rows[3]["activation_est_gib"] == result["activation_est_resident_gib"]  # the unchunked row's estimate
    assert 0 < result["activation_est_gib"] <= result["activation_est_resident_gib"] < 0.01  # the toy model


def test_budget_row_drops_the_chunk_as_the_engine_does():
    """At the budget the automatic chunk stays only where it keeps more blocks resident (accel/offload.py's
    first-call plan); the all-streamed rows come chunked and unchunked, chunked first."""
    from torch import nn

    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    bench = importlib.import_module("bench_offload")
    from ditserve.accel.offload import GIB, reserve_for

    dit = nn.Module()
    dit.blocks = nn.ModuleList(nn.Linear(512, 512, bias=False) for _ in range(8))  # 1 MiB each in float32
    block = 512 * 512 * 4 / GIB
    whole, chunked = 0.5, 0.1
    roomy = reserve_for(whole) + 11 * block  # 8 resident + 2 streamed groups' window, either way
    tight = reserve_for(chunked) + 6 * block  # chunked: 4 resident (+ window); unchunked: none
    assert bench.plan_rows(dit, 1, roomy, 4096, whole, chunked, tiny=False) == [
        ("layerwise", None, 4096), ("layerwise", roomy, None), ("layerwise", None, None)]
    assert bench.plan_rows(dit, 1, tight, 4096, whole, chunked, tiny=False) == [
        ("layerwise", None, 4096), ("layerwise", tight, 4096), ("layerwise", None, None)]
    assert bench.plan_rows(dit, 1, tight, None, whole, whole, tiny=False) == [
        ("layerwise", None, None), ("layerwise", tight, None)]


def test_tiny_wan_end_to_end_row(tmp_path):
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    out = tmp_path / "e2e.json"
    importlib.import_module("bench_offload").main(["--model", "wan2.1-t2v-14b", "--tiny", "--only-end-to-end",
                                                   "--out", str(out)])
    (row,) = json.loads(out.read_text())["end_to_end"]
    assert {"e2e_s", "resident_e2e_s", "e2e_peak_mem_gib", "offload", "gpu_memory_budget_gib", "commit"} <= set(row)
    assert row["e2e_s"] > 0 and row["max_abs_diff_vs_resident"] == 0  # same frames under offload
    assert 0 < row["activation_est_gib"] <= row["activation_est_resident_gib"]
    assert row["budget_planned_activation_gib"] > 0 and row["resident_blocks"] == 6  # planned at the first call


@pytest.mark.slow  # ≈ 16 s with inductor's cache warm, ≈ 31 s cold on 2 CPU cores (C++ kernels compile)
def test_tiny_compiled_rows_match_compiled_resident(tmp_path, monkeypatch):
    import torch

    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    # the bench raises dynamo's cache limit and apply_compile sets inductor flags: undone after the test
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", torch._dynamo.config.cache_size_limit)
    for flag in ("coordinate_descent_tuning", "epilogue_fusion"):
        monkeypatch.setattr(torch._inductor.config, flag, getattr(torch._inductor.config, flag))
    out = tmp_path / "compiled.json"
    try:
        importlib.import_module("bench_offload").main(["--model", "wan2.1-t2v-1.3b", "--tiny", "--compile",
                                                       "--reps", "1", "--out", str(out)])
    finally:
        torch._dynamo.reset()
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["compile"] is True and [r["offload"] for r in rows] == ["none"] + ["layerwise"] * 3
    for row in rows:
        assert row["compile"] is True and row["resident_step_s"] == rows[0]["step_s"]  # the compiled resident
        assert row["max_abs_diff_vs_resident"] == 0.0  # compiled streaming against compiled resident
        assert row["diffusers_offload_step_s"] > 0 and row["diffusers_resident_step_s"] > 0
    assert 0 < rows[2]["streamed_groups"] < rows[1]["streamed_groups"] == 6
