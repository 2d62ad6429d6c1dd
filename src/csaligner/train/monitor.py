"""Metrics out of the loop: metrics.csv, TensorBoard (when installed), a tqdm progress bar, and a warning
when training goes degenerate.

Degenerate training is judged from what is logged anyway, at no cost per step: a gradient norm that has
vanished (at most `GRAD_NORM_FLOOR`) while the loss is still far from 0, the minimum of every loss term
(e.g. `--train.lr=1e3`: the adapters' outputs overflow, the normalised embeddings become one point, InfoNCE
sits at log(batch) and the gradient at 0, and the run used to "succeed"). Once a run finishes,
`collapsed_embeddings` checks the saved adapters on a sample of training rows, which also covers runs
that log no gradient norm (train.grad_clip=0), and runs whose embeddings both collapse onto one line (e.g.
`--train.lr=10` on Flickr8k: the gradient stays alive at ~1e-3, InfoNCE ends at 91% of log(batch), and
retrieval is near chance).
"""

from __future__ import annotations

import csv
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

FIRST_COLUMNS = ["step", "epoch", "lr", "loss"]
GRAD_NORM_FLOOR = 1e-6
"""A logged gradient norm at or below this has vanished (trained adapters log about 0.1 to 2)."""
LOSS_FLOOR = 1e-2
"""A loss at or above this is far from the minimum, 0, of every loss term: its gradient cannot vanish."""
SPREAD_FLOOR = 1e-2
"""Mean distance of L2-normalised embeddings to their mean below which they are one point (trained: about 1)."""
LINE_SHARE = 0.9
"""Share of the normalised embeddings' variance along their top direction above which they lie on one line
(dimensional collapse; trained Flickr8k runs: about 0.05; `--train.lr=10`: 0.97 and 0.98). Judged on
both sides together (`_on_one_line`)."""
LINE_MIN_ROWS = 16
"""Fewer rows than this are not judged for a line: two points always lie on one."""


def degenerate_row(row: dict[str, float]) -> str | None:
    """Why a logged row shows degenerate training, or None: its gradient norm vanished while its loss did not."""
    grad_norm, loss = row.get("grad_norm"), row.get("loss")
    if grad_norm is None or loss is None or grad_norm > GRAD_NORM_FLOOR or loss < LOSS_FLOOR:
        return None
    return (
        f"at step {int(row['step'])} the gradient norm is {grad_norm:.2g} while the loss is still {loss:.4g} "
        "(0 at best): the adapters saturated or collapsed and stopped learning"
    )


def collapsed_embeddings(outputs: dict[str, Tensor]) -> str | None:
    """Why a finished run's embeddings are degenerate, or None.

    Args:
        outputs: {"image": (N, D), "text": (M, D)} the final adapters' outputs for N, M training rows.
    """
    units = {}
    for side, emb in outputs.items():
        unit = units[side] = F.normalize(emb.float(), dim=-1)  # as the loss sees them: an overflow makes them 0
        if not bool(torch.isfinite(unit).all()):
            return f"the {side} adapter's outputs contain NaN or Inf"
        spread = float((unit - unit.mean(0)).norm(dim=1).mean()) if unit.shape[0] > 1 else 1.0
        if spread < SPREAD_FLOOR:
            return (
                f"the {side} adapter maps all {unit.shape[0]} training rows checked to one point (mean distance of "
                f"the normalised embeddings to their mean {spread:.2g}; a trained run has about 1), so retrieval "
                "with this run is chance"
            )
    return _on_one_line(units)


def _on_one_line(units: dict[str, Tensor]) -> str | None:
    """Why the embeddings of every side lie on nearly one line, or None. Only both sides together count:
    a prior adapter passes through a line early in training, and the L2 prior objective's text side sits
    near one (0.78 after 60 steps on Flickr8k) while its image side is the identity."""
    if any(unit.shape[0] < LINE_MIN_ROWS for unit in units.values()):
        return None
    shares = {side: _top_direction_share(unit) for side, unit in units.items()}
    if not shares or min(shares.values()) <= LINE_SHARE:
        return None
    each = ", ".join(f"{side} {share:.0%}" for side, share in shares.items())
    return (
        f"the adapters map the training rows checked onto nearly one line ({each} of the normalised embeddings' "
        "variance lies along one direction; a trained run has about 5%), so retrieval with this run is near chance"
    )


def _top_direction_share(unit: Tensor) -> float:
    """The share of the rows' variance along their first principal direction."""
    s = torch.linalg.svdvals((unit - unit.mean(0)).double())
    total = float((s**2).sum())
    return float(s[0] ** 2) / total if total > 0 else 1.0


class RunMonitor:
    """Log rows of scalars. Only the main process writes; others keep nothing.

    Args:
        run_dir: where metrics.csv (and tb/) go.
        total_steps: for the progress bar.
        start_step: steps already done (a resumed run drops any CSV rows after it).
        enabled: False on non-main processes.
        tensorboard: also write TensorBoard scalars when the package is importable.
        progress: show a tqdm bar.
        advice: what to do about degenerate training, appended to its warning (e.g. "lower train.lr").
    """

    def __init__(
        self,
        run_dir: str,
        total_steps: int,
        start_step: int = 0,
        *,
        enabled: bool = True,
        tensorboard: bool = False,
        progress: bool = False,
        advice: str = "",
    ) -> None:
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.csv")
        self.history: list[dict[str, float]] = []
        self.advice = advice
        self.degenerate: list[str] = []
        """The warnings about degenerate training given so far (summary.json records them)."""
        self.columns: list[str] | None = None
        self._tb: Any = None
        self._bar: Any = None
        if not enabled:
            return
        self._truncate(start_step)
        if tensorboard:
            self._tb = _summary_writer(os.path.join(run_dir, "tb"), purge_step=start_step + 1)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _truncate(self, start_step: int) -> None:
        """Keep rows up to start_step (a crash after the last checkpoint logged steps that will be redone)."""
        if not os.path.isfile(self.path):
            return
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            self.columns = list(reader.fieldnames or [])
            rows = [r for r in reader if int(r["step"]) <= start_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(rows)

    def log(self, row: dict[str, float]) -> None:
        """Append one row (step, epoch: epochs done, fractional; lr, loss terms, samples_per_s, ...)."""
        if not self.enabled:
            return
        self.history.append(row)
        new_file = not os.path.isfile(self.path)
        if self.columns is None:
            self.columns = FIRST_COLUMNS + sorted(k for k in row if k not in FIRST_COLUMNS)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
        if self._tb is not None:
            for key, value in row.items():
                if key != "step":
                    self._tb.add_scalar(f"train/{key}", value, int(row["step"]))
        if self._bar is not None:
            shown = {k: f"{v:.4g}" for k, v in row.items() if k not in ("step", "epoch", "elapsed_s")}
            self._bar.set_postfix(shown, refresh=False)
        if not self.degenerate and (why := degenerate_row(row)) is not None:  # once a run: it does not recover
            self.warn_degenerate(why)

    def warn_degenerate(self, why: str) -> None:
        """Warn that training went degenerate (`why`), with the advice, and remember it for the summary."""
        message = f"training went degenerate: {why}. {self.advice}".strip()
        self.degenerate.append(message)
        if self._bar is not None:
            self._bar.clear()  # the warning gets its own line rather than the end of the bar's
        warnings.warn(message, stacklevel=2)
        if self._bar is not None:
            self._bar.refresh()

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()


def _summary_writer(log_dir: str, purge_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(log_dir=log_dir, purge_step=purge_step)
