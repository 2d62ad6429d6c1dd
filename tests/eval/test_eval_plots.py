"""Plots write readable, non-empty PNGs at 120 dpi; the projection shares one basis."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from csaligner.eval import (
    MeanStd,
    plot_bars,
    plot_paired_distance_hist,
    plot_projection,
    plot_sensitivity,
    plot_tradeoff,
)

pytest.importorskip("matplotlib")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    width, height = struct.unpack(">II", data[16:24])  # IHDR chunk
    return width, height


def test_plot_projection(tmp_path: Path) -> None:
    img = torch.randn(50, 8)
    pairs = {
        "before": (img, torch.randn(50, 8) + 2.0),
        "InfoNCE": (img, img + 0.5),
        "CS-Aligner": (img, torch.randn(70, 8)),  # not one-to-one: no pair lines
    }
    out = plot_projection(pairs, tmp_path / "sub" / "proj.png", max_points=30)
    assert out == tmp_path / "sub" / "proj.png" and out.stat().st_size > 5_000
    assert png_size(out) == (3 * 4.5 * 120, 4.0 * 120)  # three panels at 120 dpi


def test_plot_projection_rejects_mixed_dims_and_methods(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="feature dim"):
        plot_projection({"a": (torch.randn(5, 4), torch.randn(5, 4)), "b": (torch.randn(5, 3), torch.randn(5, 3))},
                        tmp_path / "x.png")  # fmt: skip
    with pytest.raises(ValueError, match="pca"):
        plot_projection({"a": (torch.randn(5, 4), torch.randn(5, 4))}, tmp_path / "x.png", method="tsne")


def test_plot_paired_distance_hist(tmp_path: Path) -> None:
    out = plot_paired_distance_hist(
        {"InfoNCE": torch.rand(200) + 0.8, "CS-Aligner": torch.rand(200) * 0.5}, tmp_path / "hist.png"
    )
    assert out.stat().st_size > 5_000 and png_size(out) == (6.5 * 120, 4.0 * 120)
    with pytest.raises(ValueError, match="finite"):
        plot_paired_distance_hist({"bad": torch.tensor([float("nan")])}, tmp_path / "bad.png")


def test_plot_sensitivity(tmp_path: Path) -> None:
    lams = [1e-3, 1e-2, 1e-1, 1.0]
    results = {"rsum": [(400.0, 3.0), (420.0, 2.0), (430.0, 4.0), (390.0, 5.0)]}
    out = plot_sensitivity(lams, results, "lambda", "rsum", tmp_path / "sens.png", logx=True)
    assert out.stat().st_size > 5_000
    with pytest.raises(ValueError, match="3 points"):
        plot_sensitivity(lams, {"rsum": results["rsum"][:3]}, "lambda", "rsum", tmp_path / "bad.png")


def test_plot_bars(tmp_path: Path) -> None:
    table: dict[str, dict[str, float | list[float]]] = {
        "InfoNCE": {"R@1": [70.0, 71.0, 72.0], "gap": 0.8},
        "CS-Aligner": {"R@1": 74.0},
    }
    out = plot_bars(table, tmp_path / "bars.png", title="Flickr8k")
    assert out.stat().st_size > 5_000
    assert png_size(out)[0] == 2 * int(max(3.0, 0.9 * 2 + 1.5) * 120)  # one panel per metric


def test_plot_bars_marks_missing_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A setting without the metric gets an "n/a" label where its bar would be, not an empty slot like a 0."""
    import csaligner.eval.plots as plots

    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
    table = {
        "InfoNCE": {"R@1": [70.0, 72.0], "5-shot": MeanStd(60.0, 2.0, 3)},
        "CS-Aligner": {"R@1": np.float32(74.0), "5-shot": float("nan")},
        "L2": {"5-shot": torch.tensor(55.0)},
    }
    plot_bars(table, tmp_path / "bars.png")  # type: ignore[arg-type]
    recall, few_shot = figures[0].axes
    heights = [[bar.get_height() for bar in ax.patches] for ax in (recall, few_shot)]
    assert heights[0][:2] == [71.0, 74.0] and np.isnan(heights[0][2])
    assert heights[1][0] == 60.0 and np.isnan(heights[1][1]) and heights[1][2] == 55.0
    for ax, missing in ((recall, 2), (few_shot, 1)):  # L2 has no R@1; CS-Aligner's 5-shot is NaN
        labels = [(t.get_text(), t.get_position()[0]) for t in ax.texts]
        assert labels == [("n/a", missing)]
        assert ax.get_xlim()[0] < 0 < len(table) - 1 < ax.get_xlim()[1]  # the label's slot is on the axis


def test_plot_tradeoff(tmp_path: Path) -> None:
    curves = {
        "CS": [("λ=0", 0.08, 287.2), ("λ=1", 0.042, 285.5), ("λ=10", 0.031, 234.2)],
        "KL": [("λ=0.001", 0.062, 285.1)],  # a single point is a family too
    }
    out = plot_tradeoff(curves, "centroid distance", "rsum", tmp_path / "t.png")
    assert png_size(out) == (6.5 * 120, 4.5 * 120) and out.stat().st_size > 5_000
    zoomed = plot_tradeoff(curves, "centroid distance", "rsum", tmp_path / "z.png", ylim=(250, 290))  # λ=10 outside
    assert zoomed.stat().st_size > 5_000
    with pytest.raises(ValueError, match="at least one point"):
        plot_tradeoff({"CS": []}, "x", "y", tmp_path / "bad.png")
