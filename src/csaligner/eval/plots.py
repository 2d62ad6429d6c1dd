"""Figures for the alignment reports: embedding projections, distance histograms, sweeps, bars.

matplotlib is an optional extra (`pip install 'csaligner[cli]'`), imported inside each function.
Figures are drawn on a bare `matplotlib.figure.Figure` (the Agg canvas), never through pyplot,
so no global backend or open-figure state is touched; all are saved at 120 dpi.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from csaligner._validation import check_features
from csaligner.eval._common import as_number, mean_std, per_seed_values, subsample_rows, unit_rows
from csaligner.eval._plot_labels import (
    NAME_WIDTH,
    PANEL_TITLE_WIDTH,
    annotate_inward,
    check_std,
    legend,
    missing_label,
    say_nothing_drawn,
    warn_missing,
)
from csaligner.eval.report import MeanStd, Table, Value

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 120
IMAGE_COLOR, TEXT_COLOR = "tab:blue", "tab:orange"


def _figure(n_panels: int, panel_size: tuple[float, float] = (4.5, 4.0), **subplot_kw: Any) -> tuple[Figure, list]:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'csaligner[cli]'") from err
    fig = Figure(figsize=(panel_size[0] * n_panels, panel_size[1]))
    axes = fig.subplots(1, n_panels, squeeze=False, **subplot_kw)[0]
    return fig, list(axes)


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    return out


def _finish_xy(fig: Figure, ax: Any, xlabel: str, ylabel: str, title: str | None, path: str | os.PathLike[str]) -> Path:
    """Labels, title (default "y vs x"), grid and legend of a one-panel x-y plot, then save it."""
    ax.set_xlabel(xlabel, wrap=True)
    ax.set_ylabel(ylabel, wrap=True)
    ax.set_title(title or f"{ylabel} vs {xlabel}", wrap=True)
    ax.grid(alpha=0.3)
    legend(ax)
    return _save(fig, path)


def _projection_points(
    pairs: Mapping[str, tuple[Tensor, Tensor]], max_points: int, seed: int
) -> dict[str, tuple[Tensor, Tensor, bool]]:
    """Normalised, subsampled (image, text, joined) per panel; one-to-one pairs keep the same rows."""
    gen = torch.Generator().manual_seed(int(seed))
    dims = set()
    points = {}
    for name, (img, txt) in pairs.items():
        check_features(f"pairs[{name!r}][0]", img)
        check_features(f"pairs[{name!r}][1]", txt)
        dims.update({img.shape[1], txt.shape[1]})
        joined = img.shape[0] == txt.shape[0]
        rows_i = subsample_rows(img.shape[0], max_points, gen)
        rows_t = rows_i if joined else subsample_rows(txt.shape[0], max_points, gen)
        img64, txt64 = unit_rows(img.cpu(), torch.float64), unit_rows(txt.cpu(), torch.float64)
        points[name] = (img64[rows_i], txt64[rows_t], joined)
    if len(dims) != 1 or min(dims) < 2:
        raise ValueError(f"all panels must share one feature dim D >= 2 (one PCA basis), got dims {sorted(dims)}")
    return points


def plot_projection(
    pairs: Mapping[str, tuple[Tensor, Tensor]],
    path: str | os.PathLike[str],
    method: str = "pca",
    max_points: int = 1000,
    seed: int = 0,
    *,
    connect_pairs: bool = True,
    title: str | None = None,
) -> Path:
    """Scatter image and text embeddings in 2-D, one panel per setting, on ONE shared basis.

    The PCA basis is fitted on the union of all panels' (normalised, subsampled) points, so the
    panels share axes and a gap that closes shows as clouds that merge (the paper's Fig. 1).

    Args:
        pairs: {"before": (image (N, D), text (M, D)), "InfoNCE": ..., "CS-Aligner": ...}; all D equal.
        path: PNG to write (parent folders are created).
        method: projection; only "pca" (linear, so distances stay interpretable).
        max_points: points per modality per panel (seeded subsample).
        seed: subsample seed.
        connect_pairs: join row i of image to row i of text with a faint line when N == M.
        title: figure title (a default names the method).

    Returns:
        The written path.

    Raises:
        ValueError: a method other than "pca", no panel, max_points < 1, or panels of different D.
    """
    if method != "pca":
        raise ValueError(f'method must be "pca" (a shared linear basis across panels), got {method!r}')
    if not pairs:
        raise ValueError("pairs is empty; pass {setting name: (image_emb, text_emb)}")
    if int(max_points) < 1:  # no point would be left to fit the basis on
        raise ValueError(f"max_points must be >= 1 (points per modality per panel), got {max_points!r}")
    points = _projection_points(pairs, int(max_points), seed)
    union = torch.cat([torch.cat([i, t]) for i, t, _ in points.values()])
    center = union.mean(0)
    _, sing, vh = torch.linalg.svd(union - center, full_matrices=False)
    total = sing.pow(2).sum()
    if not float(total) > 0:  # every point equal: no direction carries variance, so PCA has no basis
        raise ValueError(
            f"the embeddings of {list(pairs)} have no variance (every point is the same vector); "
            "a projection would show one dot - check that the adapters' outputs are not collapsed"
        )
    basis, explained = vh[:2].T, 100.0 * sing[:2].pow(2) / total  # (D, 2), % variance
    from matplotlib.collections import LineCollection

    fig, axes = _figure(len(points), sharex=True, sharey=True)
    for ax, (name, (img, txt, joined)) in zip(axes, points.items(), strict=True):
        pi, pt = ((img - center) @ basis).numpy(), ((txt - center) @ basis).numpy()
        if connect_pairs and joined:
            segments = [[tuple(a), tuple(b)] for a, b in zip(pi, pt, strict=True)]
            ax.add_collection(LineCollection(segments, colors="gray", alpha=0.15, linewidths=0.5, zorder=1))
        ax.scatter(pi[:, 0], pi[:, 1], s=6, alpha=0.6, color=IMAGE_COLOR, label="image", zorder=2)
        ax.scatter(pt[:, 0], pt[:, 1], s=6, alpha=0.6, color=TEXT_COLOR, label="text", zorder=2)
        for pts, color in ((pi, IMAGE_COLOR), (pt, TEXT_COLOR)):
            ax.scatter(*pts.mean(0), marker="X", s=120, color=color, edgecolors="black", zorder=3)
        ax.set_title(textwrap.fill(name, PANEL_TITLE_WIDTH))  # wrap=True would wrap at the figure's edge
        ax.set_xlabel(f"PC1 ({float(explained[0]):.0f}% var.)")
        ax.set_ylabel(f"PC2 ({float(explained[1]):.0f}% var.)")
    axes[0].legend(loc="best", markerscale=2, title="X = centroid")
    fig.suptitle(title or "Image and text embeddings, shared 2-D PCA", wrap=True)
    return _save(fig, path)


def plot_paired_distance_hist(
    dists: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    bins: int = 50,
    *,
    xlabel: str = "L2 distance between an image and its caption (unit-norm features)",
    title: str | None = None,
) -> Path:
    """Overlapping histograms of paired distances, one per setting, on shared bin edges.

    Args:
        dists: {setting: (P,) distances}.
        path: PNG to write.
        bins: number of shared bins.
        xlabel: x-axis label.
        title: figure title.

    Raises:
        ValueError: no setting, bins < 1, or a setting with no distance or a NaN or infinite one.
    """
    if not dists:
        raise ValueError("dists is empty; pass {setting name: (P,) paired distances}")
    if int(bins) < 1:  # matplotlib draws no bar at all, without a word
        raise ValueError(f"bins must be >= 1, got {bins!r}")
    values = {name: torch.as_tensor(d).detach().double().flatten().cpu() for name, d in dists.items()}
    for name, v in values.items():
        if v.numel() == 0:
            raise ValueError(f"dists[{name!r}] is empty; pass at least one paired distance")
        if not torch.isfinite(v).all():
            bad = int((~torch.isfinite(v)).sum())
            raise ValueError(
                f"dists[{name!r}] has {bad} NaN or infinite distances of {v.numel()}; a histogram cannot place them "
                "(check the embeddings they came from)"
            )
    lo = min(float(v.min()) for v in values.values())
    hi = max(float(v.max()) for v in values.values())
    edges = torch.linspace(lo, hi if hi > lo else lo + 1e-6, int(bins) + 1).numpy()
    fig, (ax,) = _figure(1, (6.5, 4.0))
    for name, v in values.items():
        ax.hist(v.numpy(), bins=edges, alpha=0.5, label=f"{name} (mean {float(v.mean()):.3f})")
    ax.set_xlabel(xlabel, wrap=True)
    ax.set_ylabel("pairs")
    ax.set_title(title or "Paired image-text distances", wrap=True)
    legend(ax)
    return _save(fig, path)


def plot_sensitivity(
    x_values: Sequence[float],
    results: Mapping[str, Sequence[tuple[float, float]]],
    xlabel: str,
    ylabel: str,
    path: str | os.PathLike[str],
    logx: bool = False,
    *,
    title: str | None = None,
) -> Path:
    """Lines with error bars: one series of (mean, std) per x value for each setting.

    A point whose x or mean is NaN or infinite (a run that diverged or was not run) cannot be drawn:
    its series' legend entry names the x values left out and how many, a `UserWarning` says the same,
    and a panel with no drawable point at all says so in its middle. A point whose std alone is NaN or
    infinite (one seed of two diverged, or a std over one run with ddof=1) is drawn as an open marker
    without an error bar, and named in the legend entry and the warning the same way.

    Args:
        x_values: the swept values (e.g. lambda or sigma).
        results: {setting: [(mean, std), ...]} aligned with x_values.
        xlabel, ylabel: axis labels.
        path: PNG to write.
        logx: log-scale x axis (for lambda sweeps over decades); every x must then be > 0.
        title: figure title.

    Raises:
        ValueError: no x value or series, a series of another length than x_values, a negative std, or
            with logx an x <= 0 (a log axis cannot place it, and matplotlib would leave it out silently).
    """
    xs = [float(x) for x in x_values]
    if not xs or not results:
        raise ValueError("plot_sensitivity needs at least one x value and one series")
    # matplotlib drops x <= 0 from a log axis without a word; unlike a NaN result, that is the caller's choice of x
    off_log = [f"{x:g}" for x in xs if logx and x <= 0]
    if off_log:
        raise ValueError(
            f"logx needs x values > 0, got {xlabel} = {', '.join(off_log)}; draw them at a small positive x "
            "(e.g. lambda = 0 at 1e-3, saying so in xlabel) or pass logx=False"
        )
    fig, (ax,) = _figure(1, (6.0, 4.0))
    labels: list[str] = []  # legend labels of the series with n/a points or error bars
    n_missing = n_no_error_bar = 0
    for name, series in results.items():
        if len(series) != len(xs):
            raise ValueError(f"results[{name!r}] has {len(series)} points but there are {len(xs)} x values")
        means, stds = [float(m) for m, _ in series], [float(s) for _, s in series]
        drawn = [math.isfinite(x) and math.isfinite(m) for x, m in zip(xs, means, strict=True)]
        for x, s in zip(xs, stds, strict=True):
            check_std(s, f"results[{name!r}] at {xlabel} = {x:g}")
        # matplotlib leaves NaN/inf points and error bars out without a word: name them in the legend and a warning
        missing = [f"{x:g}" for x, ok in zip(xs, drawn, strict=True) if not ok]
        bare = [i for i, (ok, s) in enumerate(zip(drawn, stds, strict=True)) if ok and not math.isfinite(s)]
        label = missing_label(name, missing, len(xs), f"{xlabel} = ", [f"{xs[i]:g}" for i in bare])
        yerr = [s if math.isfinite(s) else math.nan for s in stds]  # inf as NaN: no bar, not one off the axis
        drawing = ax.errorbar(xs, means, yerr=yerr, marker="o", capsize=3, label=label)
        if bare:  # an open marker: a mean drawn without the spread it should have
            color = drawing.lines[0].get_color()
            ax.plot([xs[i] for i in bare], [means[i] for i in bare], ls="none", marker="o", mfc="white", mec=color,
                    zorder=drawing.lines[0].get_zorder() + 0.1)  # fmt: skip
        labels += [label] if missing or bare else []
        n_missing += len(missing)
        n_no_error_bar += len(bare)
    if n_missing == len(xs) * len(results):
        say_nothing_drawn(ax)
    if logx:
        ax.set_xscale("log")
    warn_missing("plot_sensitivity", path, labels, n_missing, n_no_error_bar)
    return _finish_xy(fig, ax, xlabel, ylabel, title, path)


def plot_tradeoff(
    curves: Mapping[str, Sequence[tuple[str, float, float]]],
    xlabel: str,
    ylabel: str,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """One annotated line per setting family through (x, y) points, e.g. gap vs retrieval over λ.

    A point whose x or y is NaN or infinite cannot be drawn: its family's legend entry names the point
    labels left out and how many, a `UserWarning` says the same, and a panel with no drawable point at
    all says so in its middle.

    Args:
        curves: {family: [(point label, x, y), ...]} in the order to connect them (e.g. rising λ);
            each point is annotated with its label, on the side facing the middle of the axes so that
            a label at an edge stays inside them (one over 24 characters wraps).
        xlabel, ylabel: axis labels.
        path: PNG to write.
        title: figure title.
        ylim: y range to show (zoom on the interesting part); points outside it are counted in a
            note on the figure, never silently hidden.
    """
    if not curves or any(len(points) == 0 for points in curves.values()):
        raise ValueError("plot_tradeoff needs at least one family, each with at least one point")
    fig, (ax,) = _figure(1, (6.5, 4.5))
    labels: list[str] = []  # legend labels of the series with n/a points
    n_missing = 0
    colors = []
    for name, points in curves.items():
        xs, ys = [float(x) for _, x, _ in points], [float(y) for _, _, y in points]
        # matplotlib leaves NaN/inf points out without a word: name them in the legend and a warning
        drawn = [math.isfinite(x) and math.isfinite(y) for x, y in zip(xs, ys, strict=True)]
        missing = [str(label) for (label, _, _), ok in zip(points, drawn, strict=True) if not ok]
        label = missing_label(name, missing, len(points))
        (line,) = ax.plot(xs, ys, marker="o", label=label)
        colors.append(line.get_color())
        labels += [label] if missing else []
        n_missing += len(missing)
    if n_missing == sum(len(points) for points in curves.values()):
        say_nothing_drawn(ax)
    warn_missing("plot_tradeoff", path, labels, n_missing)
    if ylim is not None:
        ax.set_ylim(*ylim)
        outside = [  # an n/a point is not "outside": it is in the legend as not drawn
            f"{name} {label}"
            for name, pts in curves.items()
            for label, x, y in pts
            if math.isfinite(float(x)) and math.isfinite(float(y)) and not ylim[0] <= y <= ylim[1]
        ]
        if outside:
            note = f"outside the y range: {', '.join(outside)}"
            ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=7, va="bottom", wrap=True)
    for points, color in zip(curves.values(), colors, strict=True):  # once the limits are final
        annotate_inward(ax, points, color)
    return _finish_xy(fig, ax, xlabel, ylabel, title, path)


def plot_bars(
    table: Table,
    path: str | os.PathLike[str],
    metrics: Sequence[str] | None = None,
    *,
    title: str | None = None,
) -> Path:
    """One bar panel per metric, one bar per setting (rows), error bars for list values (mean ± std).

    A setting without the metric, or whose value is NaN or infinite, gets no bar and an "n/a" label in
    its place, so it does not read as a value of 0. A value over several seeds whose std is NaN or
    infinite gets its bar without an error bar and a "std n/a" label at its foot. A `UserWarning` names
    the values that are there but n/a, and the error bars left out (a metric a setting lacks is not one).

    Args:
        table: {setting: {metric: value, per-seed values or `MeanStd`}} (the `format_table` layout).
        path: PNG to write.
        metrics: columns to plot (default: every metric, in first-seen order).
        title: figure title.

    Raises:
        ValueError: an empty table, no metric to plot, `metrics` given as one string, or a negative std.
    """
    if not table:
        raise ValueError("table is empty; pass {setting: {metric: value}}")
    if isinstance(metrics, str):  # list("R@1") would be three panels, "R", "@" and "1", all n/a
        raise ValueError(f"metrics must be a sequence of metric names, e.g. [{metrics!r}], got the string {metrics!r}")
    names = list(metrics) if metrics is not None else list(dict.fromkeys(k for row in table.values() for k in row))
    if not names:
        why = "metrics is empty (None plots every metric)" if metrics is not None else "the table rows are empty"
        raise ValueError(f"no metric to plot: {why}")
    fig, axes = _figure(len(names), (max(3.0, 0.9 * len(table) + 1.5), 3.8))
    labels: list[str] = []  # one per panel with n/a values or error bars, for the warning
    n_missing = n_no_error_bar = 0
    for ax, metric in zip(axes, names, strict=True):
        missing, bare = _bar_panel(ax, metric, {setting: row.get(metric) for setting, row in table.items()})
        labels += [missing_label(metric, missing, len(table), "", bare)] if missing or bare else []
        n_missing += len(missing)
        n_no_error_bar += len(bare)
    if title:
        fig.suptitle(title, wrap=True)
    warn_missing("plot_bars", path, labels, n_missing, n_no_error_bar, noun="bar")
    return _save(fig, path)


def _bar_panel(ax: Any, metric: str, values: Mapping[str, Value | None]) -> tuple[list[str], list[str]]:
    """Draw one metric's bars, {setting: value or None when it lacks the metric}; return the settings
    whose value is there but n/a (NaN or infinite) and those drawn without their error bar."""
    settings = list(values)
    stats = []
    for setting, value in values.items():
        mean, std = _mean_std_or_nan(value)
        check_std(std, f"{metric} of {setting!r}")
        stats.append((mean if math.isfinite(mean) else math.nan, std))  # an endless bar cannot be drawn either
    errors = [s if math.isfinite(s) else math.nan for _, s in stats]
    has_error_bar = any(s > 0 for s in errors)  # no zero-height whiskers when no value has a spread
    ax.bar(range(len(settings)), [m for m, _ in stats], yerr=errors if has_error_bar else None, capsize=3,
           color=[f"C{i % 10}" for i in range(len(settings))])  # fmt: skip
    for i, (mean, std) in enumerate(stats):
        note = "n/a" if math.isnan(mean) else None if math.isfinite(std) else "std n/a"
        if note:  # x in data units, y in axes units: at the foot of the panel whatever the range
            ax.text(i, 0.02, note, transform=ax.get_xaxis_transform(), ha="center", va="bottom", color="gray")
    ax.set_xlim(-0.6, len(settings) - 0.4)  # every slot, also a missing one at the end (autoscale skips NaN)
    # a long setting name on one slanted line ran off the figure's left edge
    ax.set_xticks(range(len(settings)), [textwrap.fill(s, NAME_WIDTH) for s in settings], rotation=30, ha="right")
    ax.set_title(textwrap.fill(metric, NAME_WIDTH))  # wrap=True would wrap at the figure's edge, over the next panel
    ax.set_ylabel(metric)
    ax.grid(axis="y", alpha=0.3)
    missing = [s for (s, v), (m, _) in zip(values.items(), stats, strict=True) if v is not None and math.isnan(m)]
    bare = [s for s, (m, sd) in zip(settings, stats, strict=True) if not math.isnan(m) and not math.isfinite(sd)]
    return missing, bare


def _mean_std_or_nan(value: Value | None) -> tuple[float, float]:
    """(mean, std) of a table value: (NaN, 0) when it is missing or empty (drawn as "n/a"), std 0 for a single
    number or seed (no spread to show), and the std as it is (NaN too) for several seeds."""
    if value is None:
        return math.nan, 0.0
    if isinstance(value, MeanStd):
        return float(value.mean), float(value.std) if value.n > 1 else 0.0
    if (number := as_number(value)) is not None:
        return float(number), 0.0
    values = per_seed_values(value)
    return mean_std(values) if values else (math.nan, 0.0)
