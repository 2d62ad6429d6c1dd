"""Reports: Markdown tables with mean ± std, JSON with every number, figures by relative path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from csaligner.eval import MeanStd, ReportSection, format_table, format_value, write_report


def test_format_value() -> None:
    assert format_value(71.234) == "71.23"
    assert format_value([70.0, 71.0, 72.0]) == "71.00 ± 1.00"  # sample std (ddof=1)
    assert format_value([5.0]) == "5.00"
    assert format_value(3) == "3"
    assert format_value(float("nan")) == "n/a"
    assert format_value(1.5e-5, digits=2) == "1.50e-05"  # would otherwise print as 0.00
    assert format_value(0.12345, digits=3) == "0.123"


def test_small_gap_metrics_keep_two_significant_digits() -> None:
    """The README's demo row (centroid 0.068, D_CS 0.0062, separability 0.70) as the report prints it."""
    assert [format_value(v) for v in (0.0677, 0.0399, 0.00617, 0.00320, 0.704)] == [
        "0.068",
        "0.040",
        "0.0062",
        "0.0032",
        "0.70",
    ]
    assert format_value(0.00042) == "4.20e-04"  # tinier values still switch to scientific notation
    assert format_value([0.041, 0.043]) == "0.042 ± 0.0014"
    assert format_value(-0.05) == "-0.050" and format_value(0.0) == "0.00" and format_value(1.0) == "1.00"


def test_numpy_and_tensor_scalars_are_numbers(tmp_path: Path) -> None:
    """What metric code hands over (np.float32 is not a float subclass; a 0-d tensor is not a sequence)."""
    assert format_value(np.float32(1.5)) == "1.50"
    assert format_value(np.int64(3)) == "3"
    assert format_value(torch.tensor(2.5)) == "2.50"
    assert format_value(np.array(0.25)) == "0.25"
    assert format_value([np.float32(70.0), torch.tensor(72.0)]) == "71.00 ± 1.41"
    assert format_value(torch.tensor([70.0, 71.0, 72.0])) == "71.00 ± 1.00"
    with pytest.raises(TypeError, match="a number or a sequence of per-seed numbers, got str 'abc'"):
        format_value("abc")  # type: ignore[arg-type]
    row = {"a": np.float32(0.5), "b": np.int64(7), "c": torch.tensor(float("nan")), "d": [np.float32(1.0)]}
    write_report(tmp_path, "t", [ReportSection("s", table={"run": row})])  # type: ignore[dict-item]
    table = json.loads((tmp_path / "report.json").read_text())["sections"][0]["table"]["run"]
    assert table == {"a": 0.5, "b": 7, "c": None, "d": {"mean": 1.0, "std": 0.0, "values": [1.0]}}
    assert "| run | 0.50 | 7 | n/a | 1.00 |" in (tmp_path / "report.md").read_text()


def test_mean_std_summary(tmp_path: Path) -> None:
    """A summary whose per-seed values were not kept (few-shot accuracy) reads like a per-seed list."""
    assert format_value(MeanStd(71.0, 1.0, 3)) == format_value([70.0, 71.0, 72.0]) == "71.00 ± 1.00"
    assert format_value(MeanStd(5.0, 0.0, 1)) == "5.00"  # one seed: no "± 0.00"
    write_report(tmp_path, "t", [ReportSection("s", table={"run": {"1-shot": MeanStd(71.0, float("nan"), 3)}})])
    table = json.loads((tmp_path / "report.json").read_text())["sections"][0]["table"]
    assert table == {"run": {"1-shot": {"mean": 71.0, "std": None, "n": 3}}}


def test_format_table_exact() -> None:
    rows: dict[str, dict[str, float | list[float]]] = {
        "InfoNCE": {"R@1": [70.0, 71.0, 72.0], "gap": 0.81},
        "CS-Aligner": {"R@1": 74.0, "D_CS": 0.05},
    }
    assert format_table(rows) == "\n".join(
        [
            "| setting | R@1 | gap | D_CS |",
            "| --- | ---: | ---: | ---: |",
            "| InfoNCE | 71.00 ± 1.00 | 0.81 | – |",
            "| CS-Aligner | 74.00 | – | 0.050 |",  # two significant digits below 0.1
        ]
    )
    assert format_table({}) == ""
    assert "a\\|b" in format_table({"a|b": {"x": 1.0}})  # pipes in names do not break the table
    # A class rename typed as roses\=rose (a literal "=") must render as typed: Markdown would eat a lone "\".
    assert "| roses\\\\=rose |" in format_table({"roses\\=rose": {"x": 1.0}})


def test_write_report(tmp_path: Path) -> None:
    out_dir = tmp_path / "run"
    figure = out_dir / "figs" / "proj.png"
    figure.parent.mkdir(parents=True)
    figure.write_bytes(b"\x89PNG fake")
    sections = [
        ReportSection(
            heading="Retrieval (Flickr8k test)",
            text="Three seeds per setting.",
            table={"InfoNCE": {"rsum": [400.0, 410.0, 420.0]}, "CS-Aligner": {"rsum": 431.5, "gap": float("nan")}},
            figures=[figure],
        ),
        ReportSection(heading="Notes", text="No table here."),
    ]
    md_path = write_report(out_dir, "CS-Aligner vs InfoNCE", sections)
    assert md_path == out_dir / "report.md"
    md = md_path.read_text()
    assert md.startswith("# CS-Aligner vs InfoNCE\n")
    assert "## Retrieval (Flickr8k test)" in md and "Three seeds per setting." in md
    assert "| InfoNCE | 410.00 ± 10.00 | – |" in md
    assert "| CS-Aligner | 431.50 | n/a |" in md
    assert "![proj](figs/proj.png)" in md  # relative to the report folder

    data = json.loads((out_dir / "report.json").read_text())
    assert data["title"] == "CS-Aligner vs InfoNCE"
    table = data["sections"][0]["table"]
    assert table["InfoNCE"]["rsum"] == {"mean": 410.0, "std": 10.0, "values": [400.0, 410.0, 420.0]}
    assert table["CS-Aligner"] == {"rsum": 431.5, "gap": None}  # strict JSON: NaN -> null
    assert data["sections"][0]["figures"] == ["figs/proj.png"]
    empty = {"heading": "Notes", "text": "No table here.", "sources": {}, "table": {}, "figures": []}
    assert data["sections"][1] == empty


def test_sources_table(tmp_path: Path) -> None:
    """Which caches a section's numbers came from: a table of its own before the results, verbatim in JSON."""
    sources = {
        "paired": {"cache": "cache/flickr8k-dev", "images": 1000, "captions": 5000},
        "few-shot train": {"cache": "cache/a|b", "images": np.int64(1632), "classes": 102, "shots": "1,4,16"},
    }
    write_report(tmp_path, "t", [ReportSection("s", table={"run": {"rsum": 400.0}}, sources=sources)])
    md = (tmp_path / "report.md").read_text()
    assert (
        "\n".join(
            [
                "| data | cache | images | captions | classes | shots |",
                "| --- | --- | --- | --- | --- | --- |",
                "| paired | cache/flickr8k-dev | 1000 | 5000 | – | – |",
                "| few-shot train | cache/a\\|b | 1632 | – | 102 | 1,4,16 |",
            ]
        )
        in md
    )
    assert md.index("| data |") < md.index("| setting |")
    section = json.loads((tmp_path / "report.json").read_text())["sections"][0]
    assert section["sources"]["few-shot train"] == {
        "cache": "cache/a|b",
        "images": 1632,
        "classes": 102,
        "shots": "1,4,16",
    }


def test_a_source_path_is_written_as_its_text(tmp_path: Path) -> None:
    """A cache given as a Path (the docstring's "cache": path) was written as None in report.md and null in JSON."""
    sources = {"few-shot train": {"cache": Path("cache/flowers-train"), "images": np.int64(13)}}
    write_report(tmp_path, "t", [ReportSection("s", sources=sources)])
    assert "| few-shot train | cache/flowers-train | 13 |" in (tmp_path / "report.md").read_text()
    section = json.loads((tmp_path / "report.json").read_text())["sections"][0]
    assert section["sources"] == {"few-shot train": {"cache": "cache/flowers-train", "images": 13}}


def test_relative_figure_path_and_missing_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "hist.png").write_bytes(b"png")
    monkeypatch.chdir(tmp_path)
    write_report("run", "t", [ReportSection("s", figures=[Path("hist.png")])])  # relative to the report folder
    assert "![hist](hist.png)" in (tmp_path / "run" / "report.md").read_text()
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        write_report("run", "t", [ReportSection("s", figures=[Path("missing.png")])])
