"""Resuming a run from a checkpoint: `maybe_resume`, and the checks that refuse a checkpoint of another run.

A checkpoint continues a run only under the same model, data order, schedule and data; each refusal names
the difference and the way out (the checkpoint's own config, another train.out_dir).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from torch import Tensor

from csaligner.losses.objective import ignored_settings
from csaligner.train.checkpoint import Checkpoint, config_changes, latest_checkpoint, load_checkpoint, set_rng_state
from csaligner.train.overrides import to_dict
from csaligner.train.stored_config import drop_ignored_settings, trained_instead

if TYPE_CHECKING:
    from csaligner.train.loop import _Run


def _check_resume_folder(resume: str) -> None:
    """A train.resume that names no checkpoint folder: a typo ("yes"), or a run folder instead of one of its
    checkpoints. `load_checkpoint` would only list the checkpoint files missing there."""
    fix = (
        'pass train.resume=auto (the latest checkpoint in train.out_dir), "" for a fresh run, or a checkpoint '
        "folder (RUN/checkpoints/step-NNNNNNNN)"
    )
    if not os.path.exists(resume):
        raise FileNotFoundError(f"train.resume={resume!r}: no such checkpoint folder; {fix}")
    try:
        latest = latest_checkpoint(os.path.join(resume, "checkpoints"))
    except ValueError:  # a damaged run folder: load_checkpoint below names what is missing
        latest = None
    if latest is not None:
        raise FileNotFoundError(
            f"train.resume={resume!r} is a run folder, not a checkpoint; pass its latest checkpoint, "
            f"train.resume={latest}, or train.resume=auto with train.out_dir={resume}"
        )


def maybe_resume(run: _Run) -> None:
    """Load `train.resume`'s checkpoint into the freshly built run (model, objective, optimizer, scaler, EMA,
    RNG, step), after checking that it continues this run: same model, data order, schedule and data."""
    resume = run.config.train.resume
    if not resume:
        return
    path = latest_checkpoint(os.path.join(run.config.train.out_dir, "checkpoints")) if resume == "auto" else resume
    if path is None:  # "auto" before the first checkpoint: a fresh start (claim_out_dir checked the folder)
        return
    if resume != "auto":
        _check_resume_folder(resume)
    ckpt = load_checkpoint(path, map_location=run.info.device)
    _check_resumable(run, ckpt)

    def section(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in ckpt.model.items() if k.startswith(prefix)}

    try:
        run.model.load_state_dict(section("model."))
        run.objective.load_state_dict(section("objective."))
        run.optimizer.load_state_dict(ckpt.optimizer)
    except (RuntimeError, ValueError, KeyError) as err:  # shapes or names of another model
        raise ValueError(
            f"checkpoint {ckpt.path} does not fit this run's model (other adapters, out_dim or feature dims?): "
            f"{err}. Resume with the config it was trained with, or start a new run in another train.out_dir"
        ) from err
    try:
        if ckpt.state.get("scaler"):
            run.scaler.load_state_dict(ckpt.state["scaler"])
        if run.ema is not None:
            run.ema.shadow = {k: v.float() for k, v in section("ema.").items()} or run.ema.shadow
            run.ema.updates = int(ckpt.state.get("ema_updates", 0))
        set_rng_state(ckpt.state["rng"])
        run.step, run.checkpoint = int(ckpt.state["step"]), ckpt.path
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(
            f"{ckpt.path}/state.json is damaged ({type(err).__name__}: {err}); resume another checkpoint with "
            "train.resume=<checkpoint>, or start over with train.overwrite=true (and no train.resume)"
        ) from err


def _resume_command(run: _Run, ckpt: Checkpoint) -> str:
    """ ", e.g. `csalign train --config OUT/config.yaml --train.resume=auto`" when the checkpoint is this out_dir's
    own: the usual mistake is a resume without the run's --config (every setting back at its default), and the
    config.yaml a run writes once its checkpoint was accepted holds the settings that resume."""
    out_dir = run.config.train.out_dir
    stored = os.path.join(out_dir, "config.yaml")
    own = os.path.dirname(os.path.dirname(os.path.abspath(ckpt.path))) == os.path.abspath(out_dir)
    return f", e.g. `csalign train --config {stored} --train.resume=auto`" if own and os.path.isfile(stored) else ""


def _check_resumable(run: _Run, ckpt: Checkpoint) -> None:
    """The checkpoint continues this run only under the same model, data order and schedule."""
    stored = ckpt.state.get("config")
    changes: list[str] = []
    instead: list[str] = []
    if isinstance(stored, dict):
        _refuse_ignored_learned(ckpt.path, stored)
        # Adapter keys, loss and data values an earlier version ignored do not make it another model.
        widths = {side: (c.in_dim, c.out_dim) for side, c in run.adapter_configs.items()}
        loaded = drop_ignored_settings(stored, widths)
        changes = config_changes(loaded, to_dict(run.config), as_stored=stored)
        instead = trained_instead(stored, loaded)  # stored values refused now: "resume with them" cannot work
    if changes:
        but = f", except the stored values refused now, for which give what the run trained with: {', '.join(instead)}"
        raise ValueError(
            f"checkpoint {ckpt.path} was written with a different config: {'; '.join(changes)}. These change "
            "the model, the data order or the schedule, so the run would not continue where it stopped. Resume "
            f'with the checkpoint\'s values (its state.json stores them under "config"){but if instead else ""}'
            f"{_resume_command(run, ckpt) if not instead else ''}; or start a new run in another train.out_dir"
        )
    _check_same_data(run, ckpt)
    planned = ckpt.state.get("total_steps")
    if isinstance(planned, int) and planned != run.total_steps:
        raise ValueError(
            f"checkpoint {ckpt.path} planned {planned} steps and this run plans {run.total_steps} with the same "
            "config: the features differ in size. Point data.image_cache / data.text_cache at the caches it "
            "was trained on, or start a new run in another train.out_dir"
        )


def _check_same_data(run: _Run, ckpt: Checkpoint) -> None:
    """The cache paths may move between a stop and a resume (RESUME_MAY_CHANGE), but not to other data: a
    cache of other images with the same widths and step count would pass every other check."""
    stored = ckpt.state.get("data")
    stored = stored if isinstance(stored, dict) else {}  # checkpoints from before it was recorded: no check
    old, new = stored.get("manifest"), run.data_id.get("manifest")
    if old and new and old != new:
        raise ValueError(
            f"checkpoint {ckpt.path} was trained on other data ({stored.get('source') or 'unnamed'!r}, manifest "
            f"{str(old)[:12]}) than data.image_cache / data.text_cache hold now "
            f"({run.data_id.get('source') or 'unnamed'!r}, manifest {new[:12]}); resuming would continue on other "
            "images and captions. Point them at the caches the run was trained on, or start a new run in another "
            "train.out_dir"
        )


def _refuse_ignored_learned(path: str, stored: dict[str, Any]) -> None:
    """A learn_* flag its objective ignored still added a parameter (that never moved) to the checkpoint, so
    dropping the flag is not enough for the checkpoint to fit: say so, rather than "does not fit this model"."""
    loss = stored.get("loss")
    learned = [n for n in ignored_settings(loss) if n.startswith("learn_")] if isinstance(loss, dict) else []
    if learned and isinstance(loss, dict):
        flags = " and ".join(f"loss.{name}=true" for name in learned)
        raise ValueError(
            f"checkpoint {path} was trained with {flags}, which objective {loss['objective']!r} ignores (it is "
            "refused now); the unused parameter it added is in the checkpoint, so a run without it cannot "
            "continue from there. Start a new run in another train.out_dir (the setting changed nothing it learned)"
        )
