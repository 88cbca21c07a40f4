"""`ditserve` command line: generate, serve and bench."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import contextmanager

from ditserve import __version__
from ditserve.api import DitserveError, InvalidRequest
from ditserve.config import env

LOG_LEVELS = ("debug", "info", "warning", "error")
_CLI_LOGGER = "ditserve.cli"  # its INFO lines are a command's result: what was written, seed, time


class _HelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default: argparse's where it is concrete and the help does not
    already name one (options whose default depends on the model say so in their own words)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.nargs == 0  # flags: off unless given
                or action.default in (None, []) or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit status 2, and shows defaults in help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        sys.stderr.write(f"ditserve: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ditserve", description="Inference and serving for diffusion transformers. "
                     "Without --model-path, generate and serve use the bundled 64x64 demo model.")
    parser.add_argument("--version", action="version", version=f"ditserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    from ditserve.cli import bench, generate, serve

    generate.add_parser(sub)
    serve.add_parser(sub)
    bench.add_parser(sub)
    return parser


def add_log_level_arg(p: argparse.ArgumentParser) -> None:
    """`--log-level` for the one-shot commands (generate, bench)."""
    default = env.log_level().lower()
    p.add_argument("--log-level", choices=LOG_LEVELS, default=default if default in LOG_LEVELS else "info",
                   help="info: the result (files written, seed, time) and warnings; debug: also ditserve's "
                        "stage and step times and the libraries' own logs and progress bars "
                        "(default: $DITSERVE_LOG_LEVEL, else info)")


class _ResultAndWarnings(logging.Filter):
    """At `level`, the command's own lines and, from anywhere, warnings and errors."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == _CLI_LOGGER or record.name.startswith(_CLI_LOGGER + ".")
        return record.levelno >= (self.level if own else max(self.level, logging.WARNING))


@contextmanager
def cli_logging(level_name: str):
    """Log to stderr at `level_name` while a one-shot command runs (root logger restored after, so
    calling `main` in-process leaves no handler behind)."""
    level = getattr(logging, level_name.upper())
    debug = level <= logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(("%(asctime)s " if debug else "") + "%(levelname)s %(name)s: %(message)s"))
    if not debug:
        handler.addFilter(_ResultAndWarnings(level))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def main(argv: list[str] | None = None) -> int:
    """Run one `ditserve` command; returns its exit status (2: bad input, 1: failed)."""
    parser = build_parser()
    return run_command(parser, parser.parse_args(argv))


def run_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command is None:  # bare `ditserve`: the command list
        parser.print_help()
        return 0
    if hasattr(args, "log_level"):
        with cli_logging(args.log_level):
            return _run(args)
    logging.basicConfig(level=env.log_level(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return args.run(args)
    except InvalidRequest as exc:
        sys.stderr.write(f"ditserve: error: {exc.message}\n")
        return 2
    except DitserveError as exc:
        sys.stderr.write(f"ditserve: failed: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    """The `ditserve` program. A generate run without compilation ends without the interpreter's
    teardown of the ~3,700 modules torch, transformers and diffusers load (about a second, of no use
    to a command whose files are written and closed); every other command exits normally."""
    parser = build_parser()
    args = parser.parse_args()
    rc = run_command(parser, args)
    if args.command == "generate" and not args.enable_torch_compile:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
