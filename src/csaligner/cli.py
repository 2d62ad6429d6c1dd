"""The `csalign` console script. Each subcommand lives beside the code it drives.

A subcommand module exposes `add_parser(subparsers)` which registers itself and sets
`func=<callable(args) -> int>`; this file only lists them, so modules stay independent.
"""

from __future__ import annotations

import argparse
import difflib
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


def _subcommand_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def _refuse_unknown(parser: argparse.ArgumentParser, command: str, extras: list[str]) -> None:
    """Say which options `csalign COMMAND` did not recognise, as that command, with the nearest real flag.

    argparse's own message comes from the top-level parser ("usage: csalign [-h] COMMAND ...") and names
    no fix, though a misspelt `--loss.lamda=1` is nearly always one letter from a real flag.
    """
    sub = (_subcommand_parser(parser, command) if command else None) or parser
    flags = _long_flags(sub)
    parts = []
    for extra in extras:
        flag = extra.partition("=")[0]
        close = _nearest_flags(flag, flags) if flag.startswith("--") else []
        parts.append(f"{extra!r} (did you mean {' or '.join(close)}?)" if close else repr(extra))
    where = f"csalign {command}" if command else "csalign"
    sub.error(f"unrecognized arguments: {', '.join(parts)}; `{where} --help` lists the options it takes")


def _unknown_options(sub: argparse.ArgumentParser, tokens: list[str]) -> list[str]:
    """The `--flag` tokens `sub` takes neither as given nor as an abbreviation (argparse takes unique prefixes).

    `--output x` for `--out`, or `--image_cache` for `--image-cache`, otherwise reads as "the following
    arguments are required: --out", naming the flag the user did type, only spelt differently.
    """
    known = _long_flags(sub)
    unknown = []
    for token in tokens:
        if token == "--":  # what follows is positional
            break
        flag = token.partition("=")[0]
        if token.startswith("--") and not any(k.startswith(flag) for k in known):
            unknown.append(token)
    return unknown


def _long_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Every `--flag` the parser takes."""
    return [opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")]


def _nearest_flags(flag: str, flags: list[str]) -> list[str]:
    """`--loss.lamda` -> [`--loss.lam`]; `--lr` -> [`--train.lr`] (a train flag given without its section)."""
    by_key = [f for f in flags if f.endswith("." + flag[2:])]
    return by_key[:3] if by_key else difflib.get_close_matches(flag, flags, n=1, cutoff=0.75)


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
    tokens = sys.argv[1:] if argv is None else list(argv)
    command = next((t for t in tokens if not t.startswith("-")), None)
    sub = _subcommand_parser(parser, command) if command else None
    if command and sub is not None:  # before argparse: it names a required flag "missing" when only misspelt
        unknown = _unknown_options(sub, tokens[tokens.index(command) + 1 :])
        if unknown:
            _refuse_unknown(parser, command, unknown)
    args, extras = parser.parse_known_args(argv)
    if extras:
        _refuse_unknown(parser, args.command, extras)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    previous = warnings.formatwarning
    warnings.formatwarning = _warning_formatter(args.command, previous)
    try:
        return _run(args)
    finally:
        warnings.formatwarning = previous


# What Ctrl-C leaves behind that a rerun takes up (README: "An interrupted run resumes").
_AFTER_INTERRUPT: dict[str, str] = {
    "encode": "run the same command again to resume: the shards already written are kept",
    "train": "run it again with --train.resume=auto to continue from the last checkpoint in train.out_dir",
    "demo": "run it again: the finished caches and runs are reused",
}


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: a traceback into whatever torch was doing tells a user nothing
        hint = _AFTER_INTERRUPT.get(args.command)
        print(f"csalign {args.command}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130
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
