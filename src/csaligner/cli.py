"""The `csalign` console script. Each subcommand lives beside the code it drives.

A subcommand module exposes `add_parser(subparsers)` which registers itself and sets
`func=<callable(args) -> int>`; this file only lists them, so modules stay independent.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
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
