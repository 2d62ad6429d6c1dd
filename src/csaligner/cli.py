"""The `csalign` console script. Each subcommand lives beside the code it drives.

A subcommand module exposes `add_parser(subparsers)` which registers itself and sets
`func=<callable(args) -> int>`; this file only lists them, so modules stay independent.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Callable

# name -> module exposing add_parser(); imported lazily so `csalign --help` stays fast.
SUBCOMMANDS: dict[str, str] = {
    "demo": "csaligner.demo",
    "train": "csaligner.train.cli",
    "generate": "csaligner.decode.cli",
    "fid": "csaligner.decode.fid",
    "preview": "csaligner.decode.preview",
    "eval": "csaligner.eval.cli",
    "encode": "csaligner.data.encode",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csalign", description="Distributional vision-language alignment with the Cauchy-Schwarz divergence."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _warning_formatter(command: str, fallback: Callable[..., str]) -> Callable[..., str]:
    """Our own warnings as "csalign CMD: warning: ..." lines; Python's default format shows the source line
    that raised it (`sampler = BatchSampler(split, ...)`), which means nothing to a user. Warnings from
    other libraries keep their format: their file and category are what identify them."""

    def format_warning(
        message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
    ) -> str:
        if os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep):
            return f"csalign {command}: warning: {message}\n"
        return fallback(message, category, filename, lineno, line)

    return format_warning


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    previous = warnings.formatwarning
    warnings.formatwarning = _warning_formatter(args.command, previous)
    try:
        return _run(args)
    finally:
        warnings.formatwarning = previous


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:  # errors for people: no traceback
        print(f"csalign {args.command}: error: {err}", file=sys.stderr)
        return 1
    except (FileExistsError, NotADirectoryError) as err:  # e.g. --out names a file where a folder must go
        print(
            f"csalign {args.command}: error: {err}; a path that must be a folder is taken by a file: "
            "pass another path or move the file",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
