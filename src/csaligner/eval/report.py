"""Markdown + JSON reports: metric tables (settings x metrics) and figures by relative path.

`write_report` produces ``report.md`` for people and ``report.json`` with every number for
scripts. A table value is one number, a list of per-seed numbers, or a `MeanStd` (a summary whose
per-seed numbers were not kept), rendered "mean ± std" (sample std, ddof=1) in Markdown and stored
as {"mean", "std", "values"} (list) or {"mean", "std", "n"} (`MeanStd`) in JSON. A section's
`sources` (which caches, how many images) is a small table of its own, before the results.
NaN is written as "n/a" in Markdown; NaN and inf are null in JSON (strict JSON has neither).
numpy scalars and 0-d tensors are accepted wherever a number is, and written as Python numbers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, SupportsFloat

from csaligner.eval._common import as_number, mean_std, per_seed_values


@dataclass(frozen=True)
class MeanStd:
    """Mean and sample std (ddof=1) over `n` seeds, when only those were kept (e.g. few-shot accuracy)."""

    mean: float
    std: float
    n: int
    """Number of seeds; with one, only the mean is shown."""


Value = float | SupportsFloat | Sequence[float] | MeanStd
"""A number (numpy scalars and 0-d tensors included), per-seed numbers, or their mean and std."""
Table = Mapping[str, Mapping[str, Value]]


@dataclass
class ReportSection:
    """One section of a report."""

    heading: str
    """Section title (a Markdown "##" heading)."""
    text: str = ""
    """Free text under the heading: what was run and how to read it (Markdown allowed)."""
    table: Table = field(default_factory=dict)
    """Rows = settings, columns = metric names; a list holds per-seed values, a `MeanStd` their summary."""
    figures: list[Path] = field(default_factory=list)
    """PNG files to show, absolute or relative to the working directory or to the report folder."""
    sources: Mapping[str, Mapping[str, str | int | os.PathLike[str]]] = field(default_factory=dict)
    """Where the numbers came from, shown as a table before the results: {data: {"cache": path,
    "images": count, ...}}, e.g. {"few-shot train": {"cache": "cache/flowers-train", "classes": 102}}."""


def _number(v: float, digits: int) -> str:
    """`digits` decimals, and at least two significant digits below 1: gap metrics such as a centroid distance
    of 0.068 vs 0.040 or a D_CS of 0.0062 vs 0.0032 would read 0.07 vs 0.04 and mix "0.01" with "6.17e-03"."""
    if isinstance(v, int):  # counts (and bools) print as integers
        return str(int(v))
    if not math.isfinite(v):
        return "n/a" if math.isnan(v) else str(v)
    if v != 0 and abs(v) < min(10.0**-digits, 1e-3):  # would need 4+ leading zeros: keep its magnitude visible
        return f"{v:.{digits}e}"
    if v != 0 and abs(v) < 1:
        digits = max(digits, 1 - math.floor(math.log10(abs(v))))  # 0.0677 -> 3 decimals, 0.00617 -> 4
    return f"{v:.{digits}f}"


def format_value(value: Value, digits: int = 2) -> str:
    """One table cell: a number, or "mean ± std" for per-seed values or a `MeanStd` (mean alone for one seed)."""
    if isinstance(value, MeanStd):
        mean, std = float(value.mean), float(value.std)
        return _number(mean, digits) if value.n == 1 else f"{_number(mean, digits)} ± {_number(std, digits)}"
    if (number := as_number(value)) is not None:
        return _number(number, digits)
    values = per_seed_values(value)
    if not values:
        return "n/a"
    mean, std = mean_std(values)
    return _number(mean, digits) if len(values) == 1 else f"{_number(mean, digits)} ± {_number(std, digits)}"


def _cell(text: str) -> str:
    """text as one Markdown table cell: backslashes and pipes escaped (a class rename's `\\=` must show
    as typed, not as the `=` Markdown would render), newlines as spaces."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _markdown_table(rows: Mapping[str, Mapping[str, Any]], first: str, render: Callable[[Any], str], align: str) -> str:
    """Rows x columns (first-seen order) with `render(value)` cells and "–" where a row lacks a column."""
    if not rows:
        return ""
    columns = list(dict.fromkeys(k for row in rows.values() for k in row))
    lines = [
        "| " + " | ".join([first, *map(_cell, columns)]) + " |",
        "|" + "|".join([" --- ", *[f" {align} "] * len(columns)]) + "|",
    ]
    for name, row in rows.items():
        cells = [render(row[c]) if c in row else "–" for c in columns]
        lines.append("| " + " | ".join([_cell(name), *cells]) + " |")
    return "\n".join(lines)


def format_table(rows: Table, digits: int = 2) -> str:
    """Markdown table: one row per setting, one column per metric (first-seen order); "–" if missing.

    Args:
        rows: {setting: {metric: value or list of per-seed values}}.
        digits: decimals shown.

    Returns:
        The table text (no trailing newline); "" for no rows.
    """
    return _markdown_table(rows, "setting", lambda v: format_value(v, digits), "---:")


def _source_value(value: object) -> str | int | float:
    """A sources cell: a number as a Python number, anything else (a path) as its text."""
    number = None if isinstance(value, str) else as_number(value)
    return str(value) if number is None else number


def _json_value(value: Value) -> Any:
    if isinstance(value, MeanStd):
        return {"mean": _json_value(float(value.mean)), "std": _json_value(float(value.std)), "n": int(value.n)}
    if (number := as_number(value)) is not None:
        return number if math.isfinite(number) else None
    values = per_seed_values(value)
    mean, std = mean_std(values) if values else (math.nan, math.nan)
    return {"mean": _json_value(mean), "std": _json_value(std), "values": [_json_value(v) for v in values]}


def _relative_figure(figure: str | os.PathLike[str], out_dir: Path) -> str:
    """Path of an existing figure relative to the report folder (posix separators, for Markdown)."""
    candidates = [Path(figure)] if Path(figure).is_absolute() else [out_dir / figure, Path(figure)]
    for candidate in candidates:
        if candidate.is_file():
            return Path(os.path.relpath(candidate.resolve(), out_dir.resolve())).as_posix()
    raise FileNotFoundError(
        f"figure {os.fspath(figure)!r} not found (looked in {[str(c) for c in candidates]}); "
        "write the plot before the report, or pass its absolute path"
    )


def write_report(out_dir: str | os.PathLike[str], title: str, sections: Sequence[ReportSection]) -> Path:
    """Write ``report.md`` and ``report.json`` into out_dir (created if needed).

    Args:
        out_dir: destination folder; figures are linked relative to it.
        title: report title (a Markdown "#" heading).
        sections: the sections, in order.

    Returns:
        Path of report.md.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", ""]
    data: dict[str, Any] = {"title": title, "sections": []}
    for section in sections:
        figures = [_relative_figure(f, out) for f in section.figures]
        md += [f"## {section.heading}", ""]
        if section.text:
            md += [section.text.strip(), ""]
        if section.sources:
            md += [_markdown_table(section.sources, "data", lambda v: _cell(str(_source_value(v))), "---"), ""]
        if section.table:
            md += [format_table(section.table), ""]
        md += [f"![{Path(f).stem}]({f})\n" for f in figures]
        data["sections"].append(
            {
                "heading": section.heading,
                "text": section.text,
                "sources": {k: {c: _source_value(v) for c, v in row.items()} for k, row in section.sources.items()},
                "table": {row: {k: _json_value(v) for k, v in cols.items()} for row, cols in section.table.items()},
                "figures": figures,
            }
        )
    (out / "report.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    md_path = out / "report.md"
    md_path.write_text("\n".join(md).rstrip() + "\n")
    return md_path
