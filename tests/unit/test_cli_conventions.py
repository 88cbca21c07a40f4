"""What every well-kept CLI does: --version, the command list when called bare, defaults in --help,
one-line usage errors; and the README's test command prints pytest's summary line."""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ditserve
from ditserve.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"ditserve {ditserve.__version__}"
    assert ditserve.__version__ == importlib.metadata.version("ditserve")  # one version, the package's


def test_version_as_a_program_imports_no_torch():
    code = ("import runpy, sys; sys.argv = ['ditserve', '--version']\n"
            "try:\n    runpy.run_module('ditserve.cli.main', run_name='__main__')\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.stdout.splitlines() == [f"ditserve {ditserve.__version__}", "0 False"], res.stderr


def test_bare_command_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("generate", "serve", "bench"):
        assert re.search(rf"^\s+{command}\s+\S", out, re.MULTILINE), out  # each with its one-line help
    assert "--version" in out


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_help_names_every_default(command):
    """Each option's help says its default, argparse's own or in words where it is the model's."""
    parser = _subparsers(build_parser())[command]
    text = parser.format_help()
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or action.required:
            continue  # positional, on/off flags, required
        help_text = parser._get_formatter()._expand_help(action) if action.help else ""
        assert "default" in help_text, f"{action.option_strings[0]}: {help_text!r}"
    flat = " ".join(text.split())
    if command == "generate":
        assert "(default: 1)" in flat and "(default: auto)" in flat and "demo 64" in flat
    else:
        assert "(default: flux.1-dev)" in flat and "(default: FLUX 28, Wan 10 of its 50)" in flat


def test_flags_do_not_claim_a_default_of_true():
    bench = _subparsers(build_parser())["bench"]
    assert "default: True" not in " ".join(bench.format_help().split())  # --no-fused-kernels is a flag


@pytest.mark.parametrize("argv, needle", [(["nonsense"], "invalid choice"),
                                          (["generate"], "--prompt"),
                                          (["generate", "--prompt", "x", "--log-level", "loud"], "invalid choice")])
def test_usage_error_is_one_line_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and needle in err and "--help" in err, err


def test_dir_shows_the_public_api():
    names = dir(ditserve)
    assert {"Generator", "GenerationRequest", "GenerationOutput", "InvalidRequest", "__version__"} <= set(names)
    assert set(ditserve.__all__) <= set(names)


def test_readme_test_command_prints_pytest_summary_line():
    """`python -m pytest -q` with the project's pytest settings ends with "N passed ... in T s"
    (an `addopts = -q` would make it -qq, which prints no summary)."""
    target = f"{Path(__file__).relative_to(ROOT)}::test_dir_shows_the_public_api"
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", target], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    last = res.stdout.strip().splitlines()[-1]
    assert re.search(r"\b1 passed\b.* in [\d.]+s", last), res.stdout
