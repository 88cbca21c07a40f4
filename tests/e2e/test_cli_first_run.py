"""A new user's first commands: the README's quick start on the demo model prints what was written,
the seed and the time, and nothing else; library chatter waits for --log-level debug; each image of
--num-images reports its seed and how to get it again."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ditserve.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--height", "32", "--width", "48", "--num-inference-steps", "2", "--max-sequence-length", "16"]


def _readme_quick_start() -> list[str]:
    """The arguments of the README set-up's `ditserve generate` command."""
    setup = ROOT.joinpath("README.md").read_text().split("## Set-up", 1)[1]
    line = next(line for line in setup.splitlines() if "ditserve generate" in line)
    return shlex.split(line[line.index("ditserve generate"):])[1:]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DITSERVE_")}
    env["PYTHONPATH"] = str(ROOT)  # this checkout, whatever is installed
    return env


def test_readme_quick_start_prints_two_lines(tmp_path):
    args = _readme_quick_start()
    assert args[0] == "generate" and "--model-path" not in args
    res = subprocess.run([sys.executable, "-m", "ditserve.cli.main", *args], capture_output=True, text=True,
                         cwd=tmp_path, env=_clean_env(), timeout=300)
    assert res.returncode == 0, res.stderr
    output = Path(tmp_path, args[args.index("--output") + 1])
    assert Image.open(output).size == (64, 64)
    lines = res.stderr.splitlines()
    assert 1 <= len(lines) <= 3 and "\r" not in res.stderr, res.stderr  # no progress bars, no library notices
    assert all(line.startswith("INFO ditserve.cli.generate: ") for line in lines), res.stderr
    assert re.search(rf"wrote {output.name} \(64x64, seed \d+\) in [\d.]+ s generating", lines[-1]), lines[-1]
    assert res.stdout == ""


def test_debug_shows_stage_times_and_warning_level_only_warnings(tiny_flux_schnell, tmp_path, capsys):
    base = ["generate", "--model-path", str(tiny_flux_schnell), "--prompt", "owls", "--seed", "1", *SMALL]
    # warning level in a fresh process, where library chatter (import-time notices) would show
    warning = subprocess.run([sys.executable, "-m", "ditserve.cli.main", *base, "--log-level", "warning",
                              "--output", str(tmp_path / "warning.png")],
                             capture_output=True, text=True, env=_clean_env(), timeout=300)
    assert warning.returncode == 0, warning.stderr
    assert warning.stderr == ""
    # debug through the CLI's main in this process (tests/e2e/test_cli.py runs --log-level debug as a process)
    capsys.readouterr()
    assert main([*base, "--log-level", "debug", "--output", str(tmp_path / "debug.png")]) == 0
    debug = capsys.readouterr().err
    assert "stage denoise" in debug and "wrote" in debug, debug


def test_num_images_reports_each_seed_and_how_to_reproduce(tiny_flux_schnell, tmp_path, capsys):
    base = ["generate", "--model-path", str(tiny_flux_schnell), "--prompt", "owls", *SMALL]
    dump = tmp_path / "perf.json"
    assert main([*base, "--seed", "5", "--num-images", "3", "--output", str(tmp_path / "a.png"),
                 "--perf-dump-path", str(dump)]) == 0
    err = capsys.readouterr().err
    for i in (1, 2, 3):
        assert f"a_{i - 1}.png (48x32, seed 5, image {i} of 3; again: --seed 5 --num-images 3)" in err, err
    assert "is not what --seed 6 gives alone" in err
    perf = json.loads(dump.read_text())
    assert perf["seed"] == 5
    assert [(o["path"], o["seed"], o["index"], o["num_images"]) for o in perf["outputs"]] == [
        (str(tmp_path / f"a_{i}.png"), 5, i, 3) for i in range(3)]
    assert perf["outputs"][1]["reproduce"] == "--seed 5 --num-images 3 (output 2 of 3)"

    # what the report says holds: the same flags give image 2 again; --seed 6 alone does not
    assert main([*base, "--seed", "5", "--num-images", "3", "--output", str(tmp_path / "b.png")]) == 0
    assert main([*base, "--seed", "6", "--output", str(tmp_path / "c.png")]) == 0
    second = np.asarray(Image.open(tmp_path / "a_1.png"))
    assert np.array_equal(second, np.asarray(Image.open(tmp_path / "b_1.png")))
    assert not np.array_equal(second, np.asarray(Image.open(tmp_path / "c.png")))


def test_random_seed_is_reported_and_reproduces(tiny_flux_schnell, tmp_path, capsys):
    base = ["generate", "--model-path", str(tiny_flux_schnell), "--prompt", "owls", *SMALL]
    assert main([*base, "--output", str(tmp_path / "a.png")]) == 0
    seed = re.search(r"seed (\d+)\)", capsys.readouterr().err).group(1)
    assert main([*base, "--seed", seed, "--output", str(tmp_path / "b.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


@pytest.mark.parametrize("extra, warned", [([], False),
                                           (["--height", "128"], True),
                                           (["--prompt", "a red fox in the snow"], True)])
def test_demo_warns_once_outside_what_it_knows(extra, warned, tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("DITSERVE_DEFAULT_MODEL", raising=False)
    args = ["generate", "--prompt", "a red circle on the left, blue background", "--num-inference-steps", "1",
            "--seed", "0", "--output", str(tmp_path / "x.png"), *extra]
    assert main(args) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == int(warned), warnings
    if warned:
        assert warnings[0].startswith("the demo model draws 64x64 images of one shape")
        assert ("128" in warnings[0]) == ("--height" in extra) and ("fox" in warnings[0]) == ("--prompt" in extra)
