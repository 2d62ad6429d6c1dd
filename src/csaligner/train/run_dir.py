"""A run directory holds one run: who may start in it, what train.overwrite deletes, what a resume must match."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from csaligner.train.checkpoint import latest_checkpoint, step_checkpoints
from csaligner.train.config import TrainConfig
from csaligner.train.model import encoder_mismatches

# What a run (and `csalign eval` of it) leaves in out_dir that a fresh run there would mix with its own;
# train.overwrite deletes these. config.yaml is rewritten by every run.
_RUN_OUTPUTS = (
    "checkpoints",
    "summary.json",
    "image_adapter.safetensors",
    "text_adapter.safetensors",
    "metrics.csv",
    "tb",
    "encoders.json",
    "eval",
)


def claim_out_dir(cfg: TrainConfig) -> list[str]:
    """Refuse to start over in a folder holding a run; with train.overwrite, return what to delete.

    A fresh run there would interleave its checkpoints with the old run's and leave the old summary and
    adapters beside its own. resume="auto" with no checkpoint yet is a fresh start too; an explicit
    checkpoint path or one that `latest` names is a resume and goes ahead. An empty checkpoints folder
    (a run stopped before its first checkpoint) holds no run.
    """
    checkpoints = os.path.join(cfg.out_dir, "checkpoints")
    if cfg.resume and (cfg.resume != "auto" or latest_checkpoint(checkpoints) is not None):
        return []
    steps = len(step_checkpoints(checkpoints))
    previous = [f"checkpoints ({steps} step checkpoints)"] if steps else []
    previous += ["summary.json"] if os.path.exists(os.path.join(cfg.out_dir, "summary.json")) else []
    if previous and not cfg.overwrite:
        found = f"train.out_dir {cfg.out_dir!r} already holds a run ({', '.join(previous)})"
        if cfg.resume == "auto":  # nothing to continue: only a finished run without checkpoints gets here
            raise ValueError(
                f"{found}, but train.resume=auto found no checkpoint in {checkpoints} to continue from. Pick "
                "another train.out_dir, or drop train.resume and set train.overwrite=true to delete that run"
            )
        raise ValueError(
            f"{found}; starting over there would mix the two runs. Continue it with train.resume=auto, pick "
            "another train.out_dir, or set train.overwrite=true to delete the previous run first"
        )
    return [p for n in _RUN_OUTPUTS if os.path.lexists(p := os.path.join(cfg.out_dir, n))] if cfg.overwrite else []


def delete_paths(paths: list[str]) -> None:
    """Delete files and folders (what `claim_out_dir` returned); a link is removed, not followed."""
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def encoder_ids(meta: dict[str, object]) -> dict[str, str]:
    """The encoder ids a feature cache's meta records, in the form of the run's encoders.json."""
    return {k: str(meta[k]) for k in ("image_encoder", "text_encoder") if meta.get(k)}


def check_resume_encoders(out_dir: str, meta: dict[str, object]) -> None:
    """A resumed run continues on features of the encoders it started on (where both sides record them).

    The cache paths may move between a stop and a resume, but features of another encoder with the same
    width would pass every shape check and quietly train the adapters on something else.
    """
    changed = [f"{k}: {old!r} -> {new!r}" for k, old, new in encoder_mismatches(out_dir, meta)]
    if changed:
        raise ValueError(
            f"run {out_dir} was trained on features of other encoders than the caches given now ({'; '.join(changed)}; "
            f"see {out_dir}/encoders.json). Resume with data.image_cache / data.text_cache encoded by the run's "
            "encoders, or start a new run in another train.out_dir"
        )


def read_summary(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """A run's summary.json, or {} when it has none (hand-built runs, unfinished ones) or it is unreadable."""
    try:
        with open(os.path.join(out_dir, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def summary_metrics(out_dir: str) -> dict[str, float]:
    """The last logged metrics a finished run recorded: what a resume that ran no step reports (and keeps)."""
    metrics = read_summary(out_dir).get("metrics")
    return dict(metrics) if isinstance(metrics, dict) else {}
