"""Step caching through the entry points: `generate --cache*` (perf JSON), `Generator.from_pretrained(
cache=...)` with the per-request opt-out (the server's: tests/server/test_server_cache.py). The skip
decisions themselves are tested in tests/unit/test_cache.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ditserve import Generator
from ditserve.api import InvalidRequest
from ditserve.cli.main import main

PROMPT = "a red circle on the left, blue background"  # the demo model's form
CACHE = dict(method="first-block", threshold=0.3)


@pytest.fixture(scope="module")
def uncached():
    return Generator.from_pretrained(device="cpu")


@pytest.fixture(scope="module")
def cached():
    return Generator.from_pretrained(device="cpu", cache=CACHE)


def pixels(out) -> np.ndarray:
    return np.asarray(out.images[0]).astype(int)


def test_generator_cache_skips_and_reports_and_a_request_can_opt_out(cached, uncached):
    plain = uncached.generate(PROMPT, seed=4)
    fast = cached.generate(PROMPT, seed=4)
    assert plain.timings.cache is None
    assert fast.timings.cache.method == "first-block" and fast.timings.cache.forwards == 20
    assert 0 < fast.timings.cache.skipped < 20
    assert not np.array_equal(pixels(fast), pixels(plain))  # reused work shows in the pixels
    opted_out = cached.generate(PROMPT, seed=4, cache=False)
    assert np.array_equal(pixels(opted_out), pixels(plain)) and opted_out.timings.cache is None


def test_threshold_zero_skips_nothing_and_keeps_the_pixels(uncached):
    never = Generator.from_pretrained(device="cpu", cache=dict(method="dual-block", threshold=0.0, fn=1))
    out = never.generate(PROMPT, seed=5)
    assert out.timings.cache.skipped == 0 and out.timings.cache.forwards == 20
    assert np.array_equal(pixels(out), pixels(uncached.generate(PROMPT, seed=5)))


def test_generator_refuses_bad_cache_settings():
    with pytest.raises(InvalidRequest, match="unknown cache key"):
        Generator.from_pretrained(device="cpu", cache=dict(method="first-block", treshold=0.1))
    with pytest.raises(InvalidRequest, match="unknown cache method"):
        Generator.from_pretrained(device="cpu", cache="sometimes")


def test_cli_cache_flags_reach_the_perf_dump(tmp_path, cached):
    dump = tmp_path / "perf.json"
    rc = main(["generate", "--prompt", PROMPT, "--seed", "4", "--device", "cpu", "--output", str(tmp_path / "a.png"),
               "--perf-dump-path", str(dump), "--cache", "first-block", "--cache-threshold", "0.3"])
    assert rc == 0
    perf = json.loads(dump.read_text())
    expected = cached.generate(PROMPT, seed=4).timings.cache
    assert perf["cache"] == {"method": "first-block", "forwards": 20, "skipped": expected.skipped}
    rc = main(["generate", "--prompt", PROMPT, "--seed", "4", "--device", "cpu", "--output", str(tmp_path / "b.png"),
               "--perf-dump-path", str(dump)])
    assert rc == 0 and "cache" not in json.loads(dump.read_text())


@pytest.mark.parametrize("flags, message", [
    (["--cache", "magic"], "unknown cache method 'magic'"),
    (["--cache", "dual-block", "--cache-fn", "99"], "needs a middle to skip"),
    (["--cache", "first-block", "--cache-taylorseer-order", "3"], "taylorseer"),
])
def test_cli_bad_cache_flags_exit_2_with_one_line(flags, message, tmp_path, capsys):
    rc = main(["generate", "--prompt", PROMPT, "--device", "cpu", "--output", str(tmp_path / "x.png"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and message in err[-1] and not (tmp_path / "x.png").exists()


def test_teacache_is_refused_where_no_coefficients_are_published(tiny_qwen_image, tmp_path, capsys):
    rc = main(["generate", "--model-path", str(tiny_qwen_image), "--prompt", "a fox", "--device", "cpu",
               "--output", str(tmp_path / "x.png"), "--cache", "teacache"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "teacache has no published coefficients" in err[-1]


def test_generator_names_the_parallel_keys_it_knows():
    with pytest.raises(InvalidRequest, match="unknown parallel key.*enable_cfg_parallel.*cfg_parallel"):
        Generator.from_pretrained(device="cpu", parallel=dict(num_gpus=2, enable_cfg_parallel=True))
