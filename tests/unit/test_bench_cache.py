"""The step-cache speed bench (GPU) runs on the CPU at toy size for both models: every method's two
paths and diffusers' first-block cache are timed, and the rows estimate wall time from the demo's
measured skip shares."""

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")
ROW_KEYS = {"model", "gpu", "precision", "method", "computed_step_s", "reused_step_s", "skip_fraction", "est_step_s",
            "speedup_vs_uncached", "est_wall_s", "commit"}
PEER_KEYS = {"diffusers_computed_step_s", "diffusers_reused_step_s", "diffusers_est_step_s",
             "ours_over_diffusers_computed", "ours_over_diffusers_reused", "ours_over_diffusers_est"}


def load_bench():
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    return importlib.import_module("bench_cache")


def test_skip_shares_come_from_the_demo_sweep():
    bench = load_bench()
    shares = bench.settings()
    assert set(shares) == set(bench.SETTINGS)
    assert shares["teacache 0.60 +TS1"]["skipped"][50] == pytest.approx(0.676, abs=1e-3)
    keys = shares["first-block 0.08 +TS1"]["keys"]
    assert keys == {"method": "first-block", "threshold": 0.08, "taylorseer_order": 1}
    s20, s50 = shares["first-block 0.08"]["skipped"][20], shares["first-block 0.08"]["skipped"][50]
    assert bench.skip_at({20: s20, 50: s50}, 50) == (s50, "measured at 50 steps")
    f, how = bench.skip_at({20: s20, 50: s50}, 28)
    assert f == pytest.approx(s20 + (s50 - s20) * 8 / 30) and how.startswith("interpolated")
    assert bench.skip_at({20: 0.4, 50: 0.7}, 60)[0] == 0.7  # clamped past the last measured row


@pytest.mark.parametrize("model", ["flux.1-dev", "wan2.1-t2v-1.3b"])
def test_tiny_run_writes_rows(model, tmp_path):
    out = tmp_path / "cache.json"
    load_bench().main(["--model", model, "--tiny", "--reps", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["gpu"] == "cpu" and result["diffusers"]["mode"] == "eager"
    methods = result["paths"]["fp32"]["methods"]
    assert result["paths"]["fp32"]["output_finite"] and not any("error" in m for m in methods.values())
    rows = {r["method"]: r for r in result["rows"]}
    expected = {"uncached", "first-block 0.08", "first-block 0.08 +TS1", "dual-block F1B0 0.15 w3 +TS2"}
    if model == "flux.1-dev":
        expected.add("teacache 0.60 +TS1")
    else:  # no published teacache fit at the tiny Wan's width: refused, the run goes on
        assert "refused" in methods["teacache 0.60 +TS1"]
    assert set(rows) == expected
    for row in rows.values():
        assert ROW_KEYS <= set(row)
        lo, hi = sorted([row["computed_step_s"], row["reused_step_s"] or row["computed_step_s"]])
        assert lo <= row["est_step_s"] <= hi and row["est_wall_s"] > result["steps"] * row["est_step_s"]
    assert rows["uncached"]["skip_fraction"] == 0 and rows["uncached"]["speedup_vs_uncached"] == 1
    assert PEER_KEYS <= set(rows["first-block 0.08"]) and PEER_KEYS <= set(rows["first-block 0.08 +TS1"])
    assert "diffusers_est_step_s" not in rows["dual-block F1B0 0.15 w3 +TS2"]  # diffusers has no DBCache
    steps = {"flux.1-dev": 28, "wan2.1-t2v-1.3b": 50}[model]
    assert result["steps"] == steps
    assert rows["first-block 0.08 +TS1"]["skip_source"] == (
        "interpolated between the 20- and 50-step rows" if steps == 28 else "measured at 50 steps")
