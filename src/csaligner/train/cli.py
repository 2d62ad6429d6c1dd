"""`csalign train --config configs/X.yaml [--train.lr=1e-4 --loss.lam 0.1 ...]`.

Every config field becomes a `--section.field` flag (litgpt style); help text comes from the
dataclasses' attribute docstrings. Under torchrun every process runs this command.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import os
import sys
import textwrap
from typing import Any

from csaligner.losses.objective import LossConfig
from csaligner.train.config import DataConfig, ModelConfig, TrainConfig

SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "train": TrainConfig}
_PREFIX = "override:"
_ADAPTER_KEYS = ("kind", "in_dim", "out_dim")  # always offered, even before csaligner.adapters exists


def attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body ("" when none)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _adapter_fields() -> list[tuple[str, str]]:
    """(name, help) of AdapterConfig fields for --model.image.<name> flags; a minimal set without the module."""
    try:
        from csaligner.adapters import AdapterConfig

        docs = attribute_docs(AdapterConfig)
        names = [f.name for f in dataclasses.fields(AdapterConfig)]
    except (ImportError, TypeError):
        docs, names = {}, list(_ADAPTER_KEYS)
    return [(n, docs.get(n, "adapter option")) for n in names]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train adapters on cached features",
        # argparse would list all ~70 --section.key flags in the usage line, before every error message too
        usage="csalign train [-h] [--config CONFIG] [--print-config] [--SECTION.KEY=VALUE ...]",
        description="Train image/text adapters with InfoNCE + lambda * D_CS on cached features. Start from a "
        "preset (--config configs/flickr8k_cs_aligner.yaml) and override any field with --section.field=value.",
    )
    p.add_argument("--config", help="YAML preset: sections data, model, loss, train (see configs/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    for section, cls in SECTIONS.items():
        group = p.add_argument_group(f"{section} ({cls.__name__})")
        docs = attribute_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            group.add_argument(
                f"--{section}.{f.name}",
                dest=f"{_PREFIX}{section}.{f.name}",
                default=argparse.SUPPRESS,
                metavar="V",
                help=f"{docs.get(f.name, '')} (default: {default!r})".replace("%", "%%"),
            )
    group = p.add_argument_group(
        "adapter options (--model.image.NAME / --model.text.NAME)",
        "Each applies to the kind its help names (kind, in_dim and out_dim to all); one the side's kind does not "
        "use is refused. A --model.SIDE.kind flag keeps the config's other keys for that side; "
        "--model.SIDE='{kind: linear}' replaces them all.",
    )
    for side in ("image", "text"):
        for name, doc in _adapter_fields():
            help_text = doc.replace("%", "%%") if side == "image" else argparse.SUPPRESS
            group.add_argument(
                f"--model.{side}.{name}",
                dest=f"{_PREFIX}model.{side}.{name}",
                default=argparse.SUPPRESS,
                metavar="V",
                help=help_text,
            )
    p.set_defaults(func=run)


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """ "section.key=value" strings for the flags given; whole mappings before their keys."""
    items = [(k[len(_PREFIX) :], v) for k, v in vars(args).items() if k.startswith(_PREFIX)]
    return [f"{k}={v}" for k, v in sorted(items, key=lambda kv: kv[0].count("."))]


def _note(text: str) -> None:
    print(f"csalign train: {text}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from csaligner.train.loop import train
    from csaligner.train.overrides import dump_yaml, load_config

    # stderr: a note on settings dropped from a run's config.yaml must not mix into --print-config's YAML
    config = load_config(args.config, overrides_from_args(args), report=_note)
    if args.print_config:
        sys.stdout.write(dump_yaml(config))
        return 0
    result = train(config, report=print)  # the data counts line, before the first step
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 reports
        return 0
    if not result.history:  # resumed at or past the stop: say so rather than look like a training run
        print(f"{result.run_dir} had already reached step {result.step} of {result.total_steps}; no step to run")
    shown = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items() if k not in ("step", "epoch"))
    if shown:
        print(f"step {result.step}/{result.total_steps}: {shown}")
    if result.finished:
        print(f"adapters: {result.image_adapter} {result.text_adapter}")
    return 0
