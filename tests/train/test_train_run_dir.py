"""A run directory holds one run: fresh runs refuse an old run's folder, pruning and resume=auto never lose one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from csaligner.data.features import PairedFeatures
from csaligner.train import latest_checkpoint, load_config, save_checkpoint, train
from tests.train.helpers import fast_overrides, synthetic_features


def _steps(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("step-*"))


def _save(root: Path, step: int, keep: int) -> str:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    return save_checkpoint(root, step, dict(model.state_dict()), opt.state_dict(), {"step": step}, keep=keep)


def test_fresh_run_in_a_folder_with_checkpoints_is_refused(tmp_path: Path, features: PairedFeatures) -> None:
    cfg = fast_overrides(tmp_path, "train.steps=4", "train.checkpoint_every=2")
    train(load_config(None, cfg), features)
    before = _steps(tmp_path / "checkpoints")
    summary = (tmp_path / "summary.json").read_text()
    with pytest.raises(
        ValueError, match=r"(?s)already holds a run.*train\.resume=auto.*train\.out_dir.*overwrite"
    ) as err:
        train(load_config(None, [*cfg, "train.steps=6"]), features)
    assert str(tmp_path) in str(err.value)
    assert _steps(tmp_path / "checkpoints") == before == ["step-00000002", "step-00000004"]
    assert (tmp_path / "summary.json").read_text() == summary  # nothing of the old run was touched


def test_a_finished_run_without_checkpoints_is_not_overwritten(tmp_path: Path, features: PairedFeatures) -> None:
    cfg = fast_overrides(tmp_path, "train.steps=2")
    train(load_config(None, cfg), features)
    shutil.rmtree(tmp_path / "checkpoints")  # e.g. deleted to save space: summary.json and adapters remain
    for resume in ("", "auto"):  # auto finds nothing to resume, but starting over would replace the finished run
        with pytest.raises(ValueError, match=r"summary\.json"):
            train(load_config(None, [*cfg, f"train.resume={resume}"]), features)


def test_overwrite_clears_the_previous_run(tmp_path: Path, features: PairedFeatures) -> None:
    train(load_config(None, fast_overrides(tmp_path, "train.steps=6", "train.checkpoint_every=3")), features)
    result = train(load_config(None, fast_overrides(tmp_path, "train.steps=2", "train.overwrite=true")), features)
    assert result.finished and result.history[0]["step"] == 1
    assert _steps(tmp_path / "checkpoints") == ["step-00000002"]
    assert latest_checkpoint(tmp_path / "checkpoints") == result.checkpoint
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 3  # header + the new run's 2 steps


def test_overwrite_together_with_resume_is_refused() -> None:
    with pytest.raises(ValueError, match=r"train\.overwrite.*train\.resume"):
        load_config(None, ["train.overwrite=true", "train.resume=auto"])


def test_prune_never_deletes_the_new_checkpoint_or_the_one_latest_names(tmp_path: Path) -> None:
    for step in (15, 20):  # an older run's checkpoints with higher step numbers
        _save(tmp_path, step, keep=0)
    for step in (3, 6, 8):
        path = _save(tmp_path, step, keep=2)
        assert Path(path).is_dir() and latest_checkpoint(tmp_path) == path
    assert _steps(tmp_path) == ["step-00000006", "step-00000008", "step-00000015", "step-00000020"]


def test_prune_orders_steps_by_number(tmp_path: Path) -> None:
    for step in (99_999_999, 100_000_000, 100_000_001):  # past 8 digits, names no longer sort as numbers
        _save(tmp_path, step, keep=2)
    assert _steps(tmp_path) == ["step-100000000", "step-100000001"]


def test_resume_auto_with_latest_naming_a_missing_checkpoint_is_an_error(
    tmp_path: Path, features: PairedFeatures
) -> None:
    cfg = fast_overrides(tmp_path, "train.steps=6", "train.checkpoint_every=2")
    first = train(load_config(None, cfg), features, until_step=4)
    assert first.checkpoint is not None
    shutil.rmtree(first.checkpoint)
    with pytest.raises(ValueError, match=r"(?s)latest.*step-00000004.*missing.*step-00000002"):
        train(load_config(None, [*cfg, "train.resume=auto"]), features)
    assert (tmp_path / "checkpoints" / "step-00000002").is_dir()  # the older checkpoint is still there


def test_resume_auto_with_checkpoints_but_no_latest_is_an_error(tmp_path: Path, features: PairedFeatures) -> None:
    cfg = fast_overrides(tmp_path, "train.steps=6", "train.checkpoint_every=2")
    train(load_config(None, cfg), features, until_step=2)
    (tmp_path / "checkpoints" / "latest").unlink()
    with pytest.raises(ValueError, match=r"(?s)no 'latest'.*train\.resume=.*step-00000002"):
        train(load_config(None, [*cfg, "train.resume=auto"]), features)


def test_resuming_a_finished_run_keeps_its_metrics(tmp_path: Path) -> None:
    overrides = fast_overrides(tmp_path / "run", "train.steps=4")
    first = train(load_config(None, overrides), synthetic_features())
    again = train(load_config(None, [*overrides, "train.resume=auto"]), synthetic_features())
    assert first.metrics and again.metrics == first.metrics
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"] == first.metrics


def test_overwrite_keeps_the_previous_run_until_the_new_one_is_set_up(tmp_path: Path, features: PairedFeatures) -> None:
    train(load_config(None, fast_overrides(tmp_path, "train.steps=2")), features)
    before = sorted(p.name for p in tmp_path.iterdir())
    missing = fast_overrides(tmp_path, "train.steps=2", "train.overwrite=true", "data.image_cache=/nonexistent")
    with pytest.raises(FileNotFoundError, match="/nonexistent"):
        train(load_config(None, missing))  # the features fail to load: the old run must still be there
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "image_adapter.safetensors").is_file()


def test_overwrite_also_clears_the_old_runs_eval_and_encoder_record(tmp_path: Path) -> None:
    labelled = synthetic_features()
    labelled.meta.update(image_encoder="vit@1", text_encoder="bert@1")
    train(load_config(None, fast_overrides(tmp_path, "train.steps=2")), labelled)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.md").write_text("the old run's numbers")
    train(load_config(None, fast_overrides(tmp_path, "train.steps=2", "train.overwrite=true")), synthetic_features())
    assert not (tmp_path / "eval").exists() and not (tmp_path / "encoders.json").exists()


def test_resume_auto_over_an_empty_checkpoints_folder_starts_fresh(tmp_path: Path, features: PairedFeatures) -> None:
    (tmp_path / "checkpoints").mkdir()  # e.g. a run killed before its first checkpoint
    result = train(load_config(None, fast_overrides(tmp_path, "train.steps=2", "train.resume=auto")), features)
    assert result.finished and result.history[0]["step"] == 1


def test_resume_auto_finding_no_checkpoint_does_not_advise_resume_auto(
    tmp_path: Path, features: PairedFeatures
) -> None:
    cfg = fast_overrides(tmp_path, "train.steps=2")
    train(load_config(None, cfg), features)
    shutil.rmtree(tmp_path / "checkpoints")
    with pytest.raises(ValueError, match=r"(?s)found no checkpoint.*drop train\.resume.*overwrite") as err:
        train(load_config(None, [*cfg, "train.resume=auto"]), features)
    assert "Continue it with train.resume=auto" not in str(err.value)


def test_resume_on_features_of_other_encoders_is_refused(tmp_path: Path) -> None:
    cfg = fast_overrides(tmp_path, "train.steps=4", "train.checkpoint_every=2")
    first = synthetic_features()
    first.meta.update(image_encoder="vit@1", text_encoder="bert@1")
    train(load_config(None, cfg), first, until_step=2)
    other = synthetic_features()  # same shapes, another text encoder: only the record tells them apart
    other.meta.update(image_encoder="vit@1", text_encoder="e5@1")
    with pytest.raises(ValueError, match=r"text_encoder: 'bert@1' -> 'e5@1'"):
        train(load_config(None, [*cfg, "train.resume=auto"]), other)
    train(load_config(None, [*cfg, "train.resume=auto"]), synthetic_features())  # no record: nothing to compare
    assert json.loads((tmp_path / "encoders.json").read_text())["text_encoder"] == "bert@1"  # the record is kept


def test_resume_from_another_folders_checkpoint_checks_that_runs_encoders(tmp_path: Path) -> None:
    first = synthetic_features()
    first.meta.update(image_encoder="vit@1", text_encoder="bert@1")
    stopped = train(load_config(None, fast_overrides(tmp_path / "a", "train.steps=4")), first, until_step=2)
    other = synthetic_features()
    other.meta.update(image_encoder="vit@1", text_encoder="e5@1")
    moved = fast_overrides(tmp_path / "b", "train.steps=4", f"train.resume={stopped.checkpoint}")
    with pytest.raises(ValueError, match=r"text_encoder: 'bert@1' -> 'e5@1'"):
        train(load_config(None, moved), other)
