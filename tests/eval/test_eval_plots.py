"""Plots write readable, non-empty PNGs at 120 dpi; the projection shares one basis."""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every figure the plot functions save, in order (to read their legends and texts)."""
    import csaligner.eval.plots as plots

    saved: list[Any] = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: saved.append(fig) or save(fig, path))
    return saved


def legend_and_notes(fig: Any) -> tuple[list[str], list[str]]:
    """(legend entries, texts other than point annotations) of a one-panel figure; a wrapped legend entry
    is read back on one line."""
    from matplotlib.text import Annotation

    (ax,) = fig.axes
    notes = [t.get_text() for t in ax.texts if not isinstance(t, Annotation)]
    return [t.get_text().replace("\n", " ") for t in ax.get_legend().get_texts()], notes


def draw(fig: Any) -> Any:
    """Draw a saved figure as the PNG was (Agg, 120 dpi, its tight layout); return the renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig.set_dpi(120)
    FigureCanvasAgg(fig).draw()
    return fig.canvas.get_renderer()


def inside(box: Any, bounds: Any) -> bool:
    """Whether `box` lies inside `bounds` (display units, half a pixel of rounding allowed)."""
    return bool(
        bounds.x0 - 0.5 <= box.x0
        and box.x1 <= bounds.x1 + 0.5
        and bounds.y0 - 0.5 <= box.y0
        and box.y1 <= bounds.y1 + 0.5
    )


def outside_the_figure(fig: Any) -> list[str]:
    """What of a saved figure is drawn past its edges: each panel's tick and axis labels, title, legend,
    texts and annotations (its tight box), and each figure-level text (a suptitle)."""
    renderer = draw(fig)
    panels = [(f"panel {i} ({ax.get_title()!r})", ax.get_tightbbox(renderer)) for i, ax in enumerate(fig.axes)]
    texts = [(repr(t.get_text()), t.get_window_extent(renderer)) for t in fig.texts if t.get_text()]
    return [f"{what}: {box}" for what, box in panels + texts if not inside(box, fig.bbox)]


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
    same = torch.ones(5, 4)  # collapsed adapters: the axes would read "nan% var."
    with pytest.raises(ValueError, match=r"embeddings of \['a'\] have no variance"):
        plot_projection({"a": (same, same.clone())}, tmp_path / "x.png")


def test_plot_paired_distance_hist(tmp_path: Path) -> None:
    out = plot_paired_distance_hist(
        {"InfoNCE": torch.rand(200) + 0.8, "CS-Aligner": torch.rand(200) * 0.5}, tmp_path / "hist.png"
    )
    assert out.stat().st_size > 5_000 and png_size(out) == (6.5 * 120, 4.0 * 120)
    with pytest.raises(ValueError, match=r"dists\['bad'\] has 2 NaN or infinite distances of 3"):
        plot_paired_distance_hist({"bad": torch.tensor([float("nan"), 1.0, float("inf")])}, tmp_path / "bad.png")


@pytest.mark.parametrize(
    ("plot", "match"),
    [
        (lambda p: plot_paired_distance_hist({"a": torch.rand(5)}, p, bins=0), r"bins must be >= 1, got 0"),
        (lambda p: plot_paired_distance_hist({"a": torch.rand(5), "b": torch.zeros(0)}, p), r"dists\['b'\] is empty"),
        (
            lambda p: plot_projection({"a": (torch.randn(5, 4), torch.randn(5, 4))}, p, max_points=0),
            r"max_points must be >= 1 \(points per modality per panel\), got 0",
        ),
        (lambda p: plot_bars({"a": {"R@1": 1.0}}, p, metrics="R@1"), r"e\.g\. \['R@1'\], got the string 'R@1'"),
        (lambda p: plot_bars({"a": {"R@1": 1.0}}, p, metrics=[]), r"no metric to plot: metrics is empty"),
        (lambda p: plot_bars({"a": {}}, p), r"no metric to plot: the table rows are empty"),
    ],
)
def test_plots_refuse_input_with_nothing_to_draw(tmp_path: Path, plot: Callable[[Path], object], match: str) -> None:
    """Arguments that leave nothing to draw (or draw the wrong thing) are refused by name, before a file is
    written: bins=0 drew an empty figure, max_points=0 failed with an IndexError, metrics="R@1" drew three
    panels "R", "@" and "1"."""
    with pytest.raises(ValueError, match=match):
        plot(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_sensitivity(tmp_path: Path) -> None:
    lams = [1e-3, 1e-2, 1e-1, 1.0]
    results = {"rsum": [(400.0, 3.0), (420.0, 2.0), (430.0, 4.0), (390.0, 5.0)]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is n/a: no warning
        out = plot_sensitivity(lams, results, "lambda", "rsum", tmp_path / "sens.png", logx=True)
    assert out.stat().st_size > 5_000
    with pytest.raises(ValueError, match="3 points"):
        plot_sensitivity(lams, {"rsum": results["rsum"][:3]}, "lambda", "rsum", tmp_path / "bad.png")


def test_plot_sensitivity_refuses_x_a_log_axis_cannot_draw(tmp_path: Path) -> None:
    """matplotlib drops x <= 0 from a log axis without a word (lambda = 0 vanished from the sweep's plot)."""
    results = {"rsum": [(400.0, 3.0), (420.0, 2.0), (430.0, 4.0)]}
    with pytest.raises(ValueError, match=r"logx needs x values > 0, got lambda = 0, -1; draw them at a small positive"):
        plot_sensitivity([0.0, -1.0, 1.0], results, "lambda", "rsum", tmp_path / "sens.png", logx=True)
    assert not (tmp_path / "sens.png").exists()
    out = plot_sensitivity([0.0, -1.0, 1.0], results, "lambda", "rsum", tmp_path / "lin.png")  # linear: drawn
    assert out.stat().st_size > 5_000


def test_plot_sensitivity_names_nan_points(tmp_path: Path, figures: list[Any]) -> None:
    """A NaN point is not drawn: the series' legend entry and a warning say which x values and how many."""
    nan = math.nan
    results = {
        "CS": [(400.0, 3.0), (nan, nan), (430.0, 4.0), (nan, 0.0)],
        "KL": [(nan, 0.0)] * 4,  # a setting that never ran: all n/a, still in the legend
        "L2": [(380.0, 1.0)] * 4,
    }
    match = r"plot_sensitivity: 6 points n/a \(NaN or infinite\), not drawn in .*sens\.png: CS \(2 of 4 n/a"
    with pytest.warns(UserWarning, match=match) as caught:
        plot_sensitivity([1e-3, 1e-2, 1e-1, 1.0], results, "lambda", "rsum", tmp_path / "sens.png", logx=True)
    assert len(caught) == 1
    assert "KL (all 4 n/a, not drawn: lambda = 0.001, 0.01, 0.1, 1)" in str(caught[0].message)
    legend, notes = legend_and_notes(figures[0])
    assert legend == [
        "CS (2 of 4 n/a, not drawn: lambda = 0.01, 1)",
        "KL (all 4 n/a, not drawn: lambda = 0.001, 0.01, 0.1, 1)",
        "L2",
    ]
    assert notes == []  # L2 and part of CS are drawn: no "nothing to draw" note


def test_plot_sensitivity_all_nan(tmp_path: Path, figures: list[Any]) -> None:
    """No point has a value: the figure is still written, and says so rather than showing empty axes."""
    with pytest.warns(UserWarning, match=r"3 points n/a .*rsum \(all 3 n/a, not drawn: sigma = 0.5, 1, 2\)"):
        out = plot_sensitivity([0.5, 1.0, 2.0], {"rsum": [(math.nan, math.nan)] * 3}, "sigma", "rsum",
                               tmp_path / "sens.png", logx=True)  # fmt: skip
    assert out.stat().st_size > 5_000
    legend, notes = legend_and_notes(figures[0])
    assert legend == ["rsum (all 3 n/a, not drawn: sigma = 0.5, 1, 2)"]
    assert notes == ["no value to draw: every point is n/a"]


def test_plot_sensitivity_names_points_without_error_bar(tmp_path: Path, figures: list[Any]) -> None:
    """A point whose mean is drawn but whose std is NaN or infinite (two seeds, one diverged; a std over one
    run) loses its error bar: the legend entry and the warning name it, and it is drawn as an open marker."""
    nan, inf = math.nan, math.inf
    results = {
        "CS": [(400.0, 3.0), (420.0, nan), (nan, nan), (390.0, inf)],
        "L2": [(380.0, 1.0)] * 4,
    }
    match = (
        r"^plot_sensitivity: 1 point n/a \(NaN or infinite\) and 2 error bars n/a \(std NaN or infinite\), not drawn "
        r"in .*sens\.png: CS \(1 of 4 n/a, not drawn: lambda = 0\.1; 2 of 4 std n/a, no error bar: lambda = 0\.01, 1\)$"
    )
    with pytest.warns(UserWarning, match=match) as caught:
        plot_sensitivity([1e-3, 1e-2, 1e-1, 1.0], results, "lambda", "rsum", tmp_path / "sens.png", logx=True)
    assert len(caught) == 1
    legend, _ = legend_and_notes(figures[0])
    assert legend == ["CS (1 of 4 n/a, not drawn: lambda = 0.1; 2 of 4 std n/a, no error bar: lambda = 0.01, 1)", "L2"]
    (ax,) = figures[0].axes
    open_markers = [line for line in ax.lines if line.get_markerfacecolor() == "white"]
    assert len(open_markers) == 1
    assert list(open_markers[0].get_xdata()) == [1e-2, 1.0] and list(open_markers[0].get_ydata()) == [420.0, 390.0]
    cs_line = ax.containers[0].lines[0]
    assert open_markers[0].get_markeredgecolor() == cs_line.get_color()  # marks CS's points, in CS's colour


def test_plot_sensitivity_error_bars_drawn_are_the_finite_ones(tmp_path: Path, figures: list[Any]) -> None:
    """The error bars drawn span mean ± std where the std is finite and are absent (not 0 or endless) where not."""
    with pytest.warns(UserWarning, match=r"1 error bar n/a .*rsum \(1 of 3 std n/a, no error bar: sigma = 2\)$"):
        plot_sensitivity([0.5, 1.0, 2.0], {"rsum": [(10.0, 1.0), (20.0, 2.0), (30.0, math.inf)]}, "sigma", "rsum",
                         tmp_path / "sens.png")  # fmt: skip
    (ax,) = figures[0].axes
    (bars,) = ax.containers[0].lines[2]  # the vertical bars' LineCollection
    spans = [[float(y) for _, y in segment] for segment in bars.get_segments()]
    assert spans == [[9.0, 11.0], [18.0, 22.0], []]  # the third is not drawn
    assert ax.get_ylim()[1] < 40  # and does not stretch the axis


def test_plot_sensitivity_refuses_a_negative_std(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"results\['rsum'\] at lambda = 0\.1 has std -2 < 0; a standard deviation is"):
        plot_sensitivity([0.01, 0.1], {"rsum": [(1.0, 1.0), (2.0, -2.0)]}, "lambda", "rsum", tmp_path / "s.png")


def test_plot_bars(tmp_path: Path) -> None:
    table: dict[str, dict[str, float | list[float]]] = {
        "InfoNCE": {"R@1": [70.0, 71.0, 72.0], "gap": 0.8},
        "CS-Aligner": {"R@1": 74.0},
    }
    out = plot_bars(table, tmp_path / "bars.png", title="Flickr8k")
    assert out.stat().st_size > 5_000
    assert png_size(out)[0] == 2 * int(max(3.0, 0.9 * 2 + 1.5) * 120)  # one panel per metric


def test_plot_bars_marks_missing_values(tmp_path: Path, figures: list[Any]) -> None:
    """A setting without the metric gets an "n/a" label where its bar would be, not an empty slot like a 0."""
    table = {
        "InfoNCE": {"R@1": [70.0, 72.0], "5-shot": MeanStd(60.0, 2.0, 3)},
        "CS-Aligner": {"R@1": np.float32(74.0), "5-shot": float("nan")},
        "L2": {"5-shot": torch.tensor(55.0)},
    }
    with pytest.warns(UserWarning, match=r"^plot_bars: 1 bar n/a .*: 5-shot \(1 of 3 n/a, not drawn: CS-Aligner\)$"):
        plot_bars(table, tmp_path / "bars.png")  # type: ignore[arg-type]  # L2 lacking R@1 is not warned about
    recall, few_shot = figures[0].axes
    heights = [[bar.get_height() for bar in ax.patches] for ax in (recall, few_shot)]
    assert heights[0][:2] == [71.0, 74.0] and np.isnan(heights[0][2])
    assert heights[1][0] == 60.0 and np.isnan(heights[1][1]) and heights[1][2] == 55.0
    for ax, missing in ((recall, 2), (few_shot, 1)):  # L2 has no R@1; CS-Aligner's 5-shot is NaN
        labels = [(t.get_text(), t.get_position()[0]) for t in ax.texts]
        assert labels == [("n/a", missing)]
        assert ax.get_xlim()[0] < 0 < len(table) - 1 < ax.get_xlim()[1]  # the label's slot is on the axis


def test_plot_bars_marks_error_bars_and_bars_it_cannot_draw(tmp_path: Path, figures: list[Any]) -> None:
    """A std that is NaN over several seeds loses its error bar (it was drawn as 0): "std n/a" at the bar's
    foot and a warning; an infinite value gets "n/a" like NaN (its bar was silently off the axis); a single
    seed has no spread to show, so no mark."""
    table = {
        "InfoNCE": {"R@1": MeanStd(70.0, math.nan, 3)},
        "CS-Aligner": {"R@1": [74.0, math.inf]},
        "L2": {"R@1": MeanStd(60.0, math.nan, 1)},
        "KL": {"R@1": [65.0, 67.0]},
    }
    match = (
        r"^plot_bars: 1 bar n/a \(NaN or infinite\) and 1 error bar n/a \(std NaN or infinite\), not drawn in "
        r".*bars\.png: R@1 \(1 of 4 n/a, not drawn: CS-Aligner; 1 of 4 std n/a, no error bar: InfoNCE\)$"
    )
    with pytest.warns(UserWarning, match=match):
        plot_bars(table, tmp_path / "bars.png")
    (ax,) = figures[0].axes
    assert [(t.get_text(), t.get_position()[0]) for t in ax.texts] == [("std n/a", 0), ("n/a", 1)]
    heights = [bar.get_height() for bar in ax.patches]
    assert heights[0] == 70.0 and np.isnan(heights[1]) and heights[2:] == [60.0, 66.0]
    (bars,) = [c for c in ax.containers if hasattr(c, "errorbar")]
    (whiskers,) = bars.errorbar.lines[2]  # the error bars' LineCollection
    assert [[float(y) for _, y in seg] for seg in whiskers.get_segments()][3] == pytest.approx(
        [66 - 2**0.5, 66 + 2**0.5]
    )
    assert [len(seg) for seg in whiskers.get_segments()] == [0, 0, 2, 2]  # none for InfoNCE or CS-Aligner; L2's is 0
    with pytest.raises(ValueError, match=r"R@1 of 'InfoNCE' has std -1 < 0"):
        plot_bars({"InfoNCE": {"R@1": MeanStd(70.0, -1.0, 3)}}, tmp_path / "bad.png")


def test_plot_tradeoff(tmp_path: Path) -> None:
    curves = {
        "CS": [("λ=0", 0.08, 287.2), ("λ=1", 0.042, 285.5), ("λ=10", 0.031, 234.2)],
        "KL": [("λ=0.001", 0.062, 285.1)],  # a single point is a family too
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is n/a: no warning
        out = plot_tradeoff(curves, "centroid distance", "rsum", tmp_path / "t.png")
    assert png_size(out) == (6.5 * 120, 4.5 * 120) and out.stat().st_size > 5_000
    zoomed = plot_tradeoff(curves, "centroid distance", "rsum", tmp_path / "z.png", ylim=(250, 290))  # λ=10 outside
    assert zoomed.stat().st_size > 5_000
    with pytest.raises(ValueError, match="at least one point"):
        plot_tradeoff({"CS": []}, "x", "y", tmp_path / "bad.png")


CORNER_LABELS = (
    "λ=0.0001",
    "λ=1000, the strongest",
    "λ=0.1, σ=0.5, token λ=0.1 (diverged at step 40, restarted from the last checkpoint, kept)",
    "KL at the bottom right",
)


@pytest.mark.parametrize("ylim", [None, (0.0, 1.0)])
def test_plot_tradeoff_labels_stay_inside_at_the_corners(
    tmp_path: Path, figures: list[Any], ylim: tuple[float, float] | None
) -> None:
    """Points at the four corners of the axes (also exactly on a ylim): every label is drawn inside the
    figure, and inside the axes, which keep their width (a label to the right of the rightmost point ran
    off the figure, or tight_layout squeezed the axes to make room for it)."""
    from matplotlib.text import Annotation

    a, b, c, d = CORNER_LABELS
    curves = {"CS": [(a, 0.0, 0.0), (b, 1.0, 1.0)], "KL": [(c, 0.0, 1.0), (d, 1.0, 0.0)]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_tradeoff(curves, "centroid distance", "rsum", tmp_path / "t.png", ylim=ylim)
    (fig,) = figures
    renderer = draw(fig)
    (ax,) = fig.axes
    annotations = [t for t in ax.texts if isinstance(t, Annotation)]
    assert [t.get_text().replace("\n", " ") for t in annotations] == list(
        CORNER_LABELS
    )  # each drawn, long ones wrapped
    boxes = {text.get_text(): text.get_window_extent(renderer) for text in annotations}
    assert {text: box for text, box in boxes.items() if not inside(box, fig.bbox)} == {}  # cut by the figure's edge
    axes_box = ax.get_window_extent(renderer)
    assert {text: box for text, box in boxes.items() if not inside(box, axes_box)} == {}  # across an axes edge
    assert axes_box.width > 0.75 * fig.bbox.width
    assert outside_the_figure(fig) == []


LONG_NAME = "CS-Aligner, λ=0.1, σ=0.5, token λ=0.1, MLP adapters, 3 seeds"
LONG_TITLE = "Flickr8k dev retrieval and modality gap over the λ sweep, CS-Aligner vs the InfoNCE baseline, 3 seeds"
SWEEP = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0]


def _sensitivity(path: Path) -> None:
    results = {LONG_NAME: [(math.nan, 0.0)] * 8, "InfoNCE": [(400.0, 2.0)] * 8}
    plot_sensitivity(SWEEP, results, "lambda (λ=0 plotted at 1e-4)", "dev rsum", path, logx=True, title=LONG_TITLE)


def _tradeoff(path: Path) -> None:
    points = [(f"λ={x:g}", math.nan, 280.0) for x in SWEEP] + [("λ=1e4", 0.03, 250.0)]
    plot_tradeoff({LONG_NAME: points}, "centroid distance", "rsum", path, title=LONG_TITLE)


def _bars(path: Path) -> None:
    plot_bars({LONG_NAME: {"R@1": [70.0, 72.0]}, "InfoNCE": {"R@1": 68.0}}, path, title=LONG_TITLE)


def _hist(path: Path) -> None:
    plot_paired_distance_hist({LONG_NAME: torch.rand(50), f"{LONG_NAME} (no prior)": torch.rand(50)}, path,
                              title=LONG_TITLE)  # fmt: skip


def _projection(path: Path) -> None:
    pairs = {name: (torch.randn(20, 8), torch.randn(20, 8)) for name in (LONG_NAME, f"{LONG_NAME}, no prior")}
    plot_projection(pairs, path, title=LONG_TITLE)


@pytest.mark.parametrize("plot", [_sensitivity, _tradeoff, _bars, _hist, _projection], ids=lambda f: f.__name__[1:])
def test_long_names_and_titles_stay_inside_the_figure(
    tmp_path: Path, figures: list[Any], plot: Callable[[Path], None]
) -> None:
    """A long setting name, a legend entry naming 8 n/a points and a long title wrap instead of running
    off the figure (a one-line legend entry or slanted tick label was cut at its edge)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the n/a points are warned about; that is tested above
        plot(tmp_path / "fig.png")
    assert outside_the_figure(figures[0]) == []
    renderer = figures[0].canvas.get_renderer()
    titles = [ax.title.get_window_extent(renderer) for ax in figures[0].axes]
    assert not any(a.overlaps(b) for i, a in enumerate(titles) for b in titles[i + 1 :])  # side by side panels


def test_plot_tradeoff_names_nan_points(tmp_path: Path, figures: list[Any]) -> None:
    """A point with a NaN coordinate is not drawn: its family's legend entry and a warning name its label;
    it gets no annotation and is not reported as outside the y range."""
    curves = {
        "CS": [("λ=0", 0.08, 287.2), ("λ=1", math.nan, 285.5), ("λ=10", 0.031, math.nan)],
        "KL": [("λ=0.001", 0.062, 285.1)],
    }
    match = r"plot_tradeoff: 2 points n/a .*/t\.png: CS \(2 of 3 n/a, not drawn: λ=1, λ=10\)$"
    with pytest.warns(UserWarning, match=match):
        plot_tradeoff(curves, "centroid distance", "rsum", tmp_path / "t.png", ylim=(286.0, 290.0))
    legend, notes = legend_and_notes(figures[0])
    assert legend == ["CS (2 of 3 n/a, not drawn: λ=1, λ=10)", "KL"]
    assert notes == ["outside the y range: KL λ=0.001"]  # λ=10 is n/a, not outside
    from matplotlib.text import Annotation

    (ax,) = figures[0].axes
    assert [t.get_text() for t in ax.texts if isinstance(t, Annotation)] == ["λ=0", "λ=0.001"]


def test_plot_tradeoff_all_nan(tmp_path: Path, figures: list[Any]) -> None:
    with pytest.warns(UserWarning, match=r"1 point n/a .*CS \(all 1 n/a, not drawn: λ=0\)"):
        out = plot_tradeoff({"CS": [("λ=0", math.nan, math.nan)]}, "gap", "rsum", tmp_path / "t.png")
    assert out.stat().st_size > 5_000
    legend, notes = legend_and_notes(figures[0])
    assert legend == ["CS (all 1 n/a, not drawn: λ=0)"]
    assert notes == ["no value to draw: every point is n/a"]
