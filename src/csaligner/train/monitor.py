"""Metrics out of the loop: metrics.csv, TensorBoard (when installed) and a tqdm progress bar."""

from __future__ import annotations

import csv
import os
from typing import Any

FIRST_COLUMNS = ["step", "epoch", "lr", "loss"]


class RunMonitor:
    """Log rows of scalars. Only the main process writes; others keep nothing.

    Args:
        run_dir: where metrics.csv (and tb/) go.
        total_steps: for the progress bar.
        start_step: steps already done (a resumed run drops any CSV rows after it).
        enabled: False on non-main processes.
        tensorboard: also write TensorBoard scalars when the package is importable.
        progress: show a tqdm bar.
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
    ) -> None:
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.csv")
        self.history: list[dict[str, float]] = []
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
        """Append one row (step, epoch, lr, loss terms, samples_per_s, ...)."""
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
