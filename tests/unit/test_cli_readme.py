"""The README's commands and the CLI's parser agree: one source of truth for flags and defaults.

Adding a flag to `ditserve generate` or `bench` means adding it to the README's "## Commands" block
too (and the other way round); a value the block shows for a flag must be the parser's default or
list its choices; and every concrete `ditserve ...` command in a README code block must parse.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from ditserve.cli.main import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"
CHECKED = ("generate", "bench")  # serve's block lives in the README's Server section
_OPTION = re.compile(r"\[(--[a-z0-9-]+)(?: ([^\]\s]+))?\]|(?<![\w\[-])(--[a-z0-9-]+)(?: ([^\s\[]+))?")
_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def _blocks(text: str, lang: str = "bash") -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def _commands_block() -> dict[str, str]:
    """The "## Commands" section's first bash block: command -> its usage text (continuations joined)."""
    text = README.read_text()
    section = text[text.index("## Commands"):]
    usage: dict[str, str] = {}
    for line in _blocks(section)[0].splitlines():
        line = line.split("#")[0]
        if line.startswith("ditserve "):
            current = line.split()[1]
            usage[current] = line
        elif line.strip():
            usage[current] += " " + line.strip()
    return usage


def _readme_options(usage: str) -> dict[str, str | None]:
    """flag -> the value shown with it (None for on/off flags and bare metavars)."""
    found = {}
    for m in _OPTION.finditer(usage):
        flag, value = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        found[flag] = value
    return found


def _parser_actions(command: str) -> dict[str, argparse.Action]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {opt: a for a in sub._actions for opt in a.option_strings if opt.startswith("--") and opt != "--help"}


@pytest.mark.parametrize("command", CHECKED)
def test_readme_flags_are_the_parsers(command):
    readme = set(_readme_options(_commands_block()[command]))
    parser = set(_parser_actions(command))
    assert not readme - parser, f"in the README's {command} block but not in the parser: {sorted(readme - parser)}"
    assert not parser - readme, f"in the parser but not in the README's {command} block: {sorted(parser - readme)}"


@pytest.mark.parametrize("command", CHECKED)
def test_readme_values_are_defaults_or_choices(command):
    actions = _parser_actions(command)
    for flag, shown in _readme_options(_commands_block()[command]).items():
        action = actions[flag]
        if shown is None or action.nargs == 0:
            continue
        alternatives = shown.split("|")
        if action.choices is not None:  # all of them, or one as an example
            choices = {str(c) for c in action.choices}
            assert set(alternatives) == choices or {shown} <= choices, f"{flag} {shown} vs {action.choices}"
        elif action.default not in (None, []):
            assert str(action.default) in alternatives, f"{flag}: README shows {shown}, parser default {action.default}"
        else:  # the default is the model's: a bare number would read as a fixed default
            assert not _NUMBER.fullmatch(shown), f"{flag}: README shows {shown}, but the default is the model's"


def _concrete_commands() -> list[str]:
    """`ditserve ...` invocations (not usage lines) in the README's bash blocks."""
    found = []
    for block in _blocks(README.read_text()):
        for line in block.splitlines():
            for part in re.split(r"&&|;|\|\|", line.split(" #")[0]):
                part = part.strip()
                if part.startswith("ditserve ") and "[" not in part and "COMMAND" not in part:
                    found.append(part)
    return found


def test_readme_command_lines_parse():
    commands = _concrete_commands()
    assert any(c.startswith("ditserve generate") for c in commands)  # the set-up's first command
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])  # argparse exits 2 on a flag it does not know
        assert args.command, command


def test_checker_sees_a_mismatch():
    """The checks above can fail: a flag missing from the block, a wrong default, a number for a
    model default."""
    usage = _commands_block()["generate"]
    assert "--seed" in _readme_options(usage)
    assert "--seed" not in _readme_options(usage.replace("[--seed S]", ""))
    assert _readme_options("ditserve x [--num-images 2] [--height 1024] [--flag]") == {
        "--num-images": "2", "--height": "1024", "--flag": None}
