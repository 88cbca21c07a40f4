"""The scaling benchmark (GPU) runs end to end on the CPU with tiny models over gloo and writes the
rows the lead reads: model, gpu, num_gpus, mode, step_s, speedup (vs 1 GPU of the same run), commit."""

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")


def load_bench():
    # importable by name: the spawned ranks import rank_run from it (spawn passes sys.path on)
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    return importlib.import_module("bench_parallel")


def test_degrees_fit_the_gpu_counts():
    bench = load_bench()
    assert bench.degrees("single", 1) == {} and bench.degrees("single", 2) is None
    assert bench.degrees("cfg", 2) == dict(cfg_parallel=True) and bench.degrees("cfg", 4) is None
    assert bench.degrees("usp", 8) == dict(ulysses_degree=4, ring_degree=2) and bench.degrees("usp", 2) is None
    assert bench.degrees("cfg-ulysses", 8) == dict(cfg_parallel=True, ulysses_degree=4)


@pytest.mark.parametrize("modes", ["cfg", pytest.param("cfg,ulysses", marks=pytest.mark.slow)])  # a gloo group each
def test_tiny_run_writes_rows(tmp_path, modes):
    out = tmp_path / "rows.json"
    # --counts 2: the 1-GPU reference runs anyway; the file is written after every configuration
    load_bench().main(["--tiny", "--models", "tiny-flux", "--modes", modes, "--counts", "2", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["mode"], r["num_gpus"]) for r in rows] == [("single", 1)] + [(m, 2) for m in modes.split(",")]
    for row in rows:
        assert {"model", "gpu", "num_gpus", "mode", "step_s", "speedup", "commit"} <= set(row)
        assert row["step_s"] > 0 and row["gpu"] == "cpu"
    assert rows[0]["speedup"] == 1.0
    # each mode's guided prediction against the single process's, same weights and inputs (float32)
    assert "rel_l2" not in rows[0] and all(r["rel_l2"] < 1e-5 for r in rows[1:])
    assert 0 <= rows[0]["rel_l2_batch_floor"] < 1e-5  # float32: batch 1 and 2 agree
    # the step's collectives, recorded and replayed alone (CFG-parallel: the one all-gather of the branches)
    assert rows[0]["collectives"] == 0 and all(r["collectives"] >= 1 and r["comm_alone_s"] > 0 for r in rows[1:])


def test_counts_pick_the_gpu_counts(tmp_path):
    out = tmp_path / "rows.json"
    load_bench().main(["--tiny", "--models", "tiny-flux", "--modes", "cfg", "--counts", "1", "--out", str(out)])
    assert [(r["mode"], r["num_gpus"]) for r in json.loads(out.read_text())] == [("single", 1)]


def test_branch_halves_slice_only_batched_fields():
    import torch

    from ditserve.bench.flux import inputs
    from ditserve.models.flux import FluxConfig

    bench = load_bench()
    cfg = FluxConfig.from_dict(bench.TINY["tiny-flux"].arch)
    pair = inputs(cfg, 64, 80, 7, "cpu", torch.float32, batch=2)
    uncond = bench.half(pair, 1)
    assert torch.equal(uncond.img, pair.img[1:]) and torch.equal(uncond.txt, pair.txt[1:])
    assert torch.equal(uncond.img_ids, pair.img_ids) and torch.equal(uncond.txt_ids, pair.txt_ids)
    assert not torch.equal(bench.half(pair, 0).txt, uncond.txt)  # the branches see different text


@pytest.mark.slow
def test_degree_one_overhead_bench_runs_both_paths(tmp_path):
    """benchmarks/bench_parallel_overhead.py: in-process and one-rank executor, same video (its guard)."""
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    out = tmp_path / "overhead.json"
    assert importlib.import_module("bench_parallel_overhead").main(
        ["--tiny", "--steps", "2", "--reps", "1", "--replicas", "2", "--requests", "2", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["max_pixel_diff"] <= 1 and row["in_process_median_s"] > 0 and row["executor_median_s"] > 0
    # the throughput part: requests submitted at once spread over both replicas (warm-up + one each)
    assert sum(row["replica_batches"]) == 4 and min(row["replica_batches"]) >= 1
    assert row["throughput_2_rps"] > 0 and row["throughput_1_rps"] > 0
