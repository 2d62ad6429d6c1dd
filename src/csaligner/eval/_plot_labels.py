"""How the plots name what they cannot draw, and keep their labels inside the figure (private).

matplotlib leaves a NaN or infinite point, error bar or bar out without a word, and draws a label
wherever it is put, across an axes edge or past the figure's. These helpers name the points left out
(in a legend entry and one `UserWarning` per figure) and place or wrap labels so they stay inside.
"""

from __future__ import annotations

import math
import os
import textwrap
import warnings
from collections.abc import Sequence
from typing import Any

PANEL_TITLE_WIDTH = 40
"""Characters per line of a panel's title before it wraps: a 4.5 in panel holds about 45 at 12 pt."""
NAME_WIDTH = 20
"""Characters per line of a setting's name under its bar, or a metric's over its panel, before it wraps."""
LEGEND_WIDTH = 45
"""Characters per line of a legend entry before it wraps (about 4 in at 10 pt: inside the narrowest axes)."""


def legend(ax: Any) -> None:
    """The legend, its long entries wrapped: one naming its n/a points ran off the figure on one line."""
    handles, texts = ax.get_legend_handles_labels()
    ax.legend(handles, [textwrap.fill(text, LEGEND_WIDTH) for text in texts], loc="best")


def missing_label(
    name: str, missing: Sequence[str], total: int, where: str = "", no_error_bar: Sequence[str] = ()
) -> str:
    """Legend label of a series: its name, and how many and which of its `total` points are n/a (not drawn)
    and which are drawn without their error bar (a std that is n/a).

    `where` prefixes each list of points, e.g. "lambda = " before "0.001, 1".
    """
    parts = []
    for points, what in ((missing, "n/a, not drawn"), (no_error_bar, "std n/a, no error bar")):
        if points:
            count = f"all {total}" if len(points) == total else f"{len(points)} of {total}"
            parts.append(f"{count} {what}: {where}{', '.join(points)}")
    return f"{name} ({'; '.join(parts)})" if parts else name


def warn_missing(
    function: str,
    path: str | os.PathLike[str],
    labels: Sequence[str],
    n: int,
    n_no_error_bar: int = 0,
    noun: str = "point",
) -> None:
    """Warn that `n` points are n/a (NaN or infinite) and `n_no_error_bar` error bars are (their std is), so
    not drawn, naming them (`labels` from `missing_label`)."""
    counts = [f"{n} {noun}{'s' * (n != 1)} n/a (NaN or infinite)"] if n else []
    if n_no_error_bar:
        counts.append(f"{n_no_error_bar} error bar{'s' * (n_no_error_bar != 1)} n/a (std NaN or infinite)")
    if counts:
        warnings.warn(f"{function}: {' and '.join(counts)}, not drawn in {path}: {'; '.join(labels)}", stacklevel=3)


def check_std(std: float, where: str) -> None:
    """A negative std is a bug upstream (matplotlib refuses it without saying which point)."""
    if std < 0:
        raise ValueError(f"{where} has std {std:g} < 0; a standard deviation is >= 0: check how it was computed")


def say_nothing_drawn(ax: Any) -> None:
    """Centre a note on a panel none of whose points has a value, so it does not read as a plotting bug."""
    ax.text(0.5, 0.5, "no value to draw: every point is n/a", transform=ax.transAxes, ha="center", color="gray")


POINT_LABEL_WIDTH = 24
"""Characters per line of a point annotation before it wraps: half the axes holds about 40 at 7 pt."""


def annotate_inward(ax: Any, points: Sequence[tuple[str, float, float]], color: str) -> None:
    """Annotate each finite point with its label on the side that faces the middle of the axes.

    A label always to the upper right ran past the axes at the right and top edges: off the figure, or
    tight_layout shrank the axes to keep it. Here a point in the right half is labelled to its left, one
    in the top quarter below it, one in the bottom quarter above it; the others alternate above and
    below (neighbours on a line, close in y, do not overprint). Points outside the limits get none.
    """
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    for k, (point, x, y) in enumerate(points):
        x, y = float(x), float(y)
        if not (math.isfinite(x) and math.isfinite(y)):
            continue  # an n/a point has no place to annotate; its family's legend entry names it
        to_right, fy = (x - x0) / (x1 - x0) <= 0.5, (y - y0) / (y1 - y0)
        above = fy < 0.25 or (fy <= 0.75 and k % 2 == 0)
        ax.annotate(
            textwrap.fill(str(point), POINT_LABEL_WIDTH),
            (x, y),
            textcoords="offset points",
            xytext=(4 if to_right else -4, 4 if above else -4),
            ha="left" if to_right else "right",
            va="bottom" if above else "top",
            fontsize=7,
            color=color,
        )
