"""`csalign demo`: placeholder until the toy and real demos land."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job end to end")
    p.set_defaults(func=lambda args: 0)
