"""`ditserve` command line: generate (and, later, serve and bench)."""

from __future__ import annotations

import argparse
import logging
import sys

from ditserve.api import DitserveError, InvalidRequest
from ditserve.config import env


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit status 2."""

    def error(self, message: str):
        sys.stderr.write(f"ditserve: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ditserve", description="Inference and serving for diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    from ditserve.cli import bench, generate, serve

    generate.add_parser(sub)
    serve.add_parser(sub)
    bench.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=env.log_level(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
