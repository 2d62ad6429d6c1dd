"""The Flickr demo reuses a trained run only when its saved settings equal the new ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from csaligner.flickr_demo import FlickrDemoSettings, _prepare_run, config_changes, demo_overrides
from csaligner.train import load_config
from csaligner.train.overrides import dump_yaml

CACHES = {k: Path(f"cache/{k}") for k in ("train_image", "train_text", "dev_image", "dev_text")}


def _saved_run(tmp_path: Path, settings: FlickrDemoSettings, finished: bool = True) -> Path:
    run_dir = tmp_path / "cs_aligner"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_yaml(load_config(None, demo_overrides(settings, CACHES, "cs_aligner"))))
    if finished:
        (run_dir / "summary.json").write_text("{}")
    return run_dir


def test_same_settings_reuse_the_run(tmp_path: Path) -> None:
    s = FlickrDemoSettings(out_dir=tmp_path)
    run_dir = _saved_run(tmp_path, s)
    config = load_config(None, [*demo_overrides(s, CACHES, "cs_aligner"), "train.progress=false"])
    assert config_changes(run_dir, config) == []  # bookkeeping flags do not count
    assert _prepare_run("CS-Aligner", run_dir, config) is True
    assert (run_dir / "summary.json").is_file()


def test_changed_settings_are_named_and_the_run_is_trained_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _saved_run(tmp_path, FlickrDemoSettings(out_dir=tmp_path, epochs=2))
    config = load_config(None, demo_overrides(FlickrDemoSettings(out_dir=tmp_path, epochs=6), CACHES, "cs_aligner"))
    assert config_changes(run_dir, config) == ["train.epochs: 2 -> 6"]
    assert _prepare_run("CS-Aligner", run_dir, config) is False
    assert not run_dir.exists()  # the stale run is gone, so the report cannot mix settings
    out = capsys.readouterr().out
    assert "other settings" in out and "train.epochs: 2 -> 6" in out


def test_an_interrupted_run_with_the_same_settings_is_left_to_resume(tmp_path: Path) -> None:
    s = FlickrDemoSettings(out_dir=tmp_path)
    run_dir = _saved_run(tmp_path, s, finished=False)
    (run_dir / "checkpoints").mkdir()
    config = load_config(None, demo_overrides(s, CACHES, "cs_aligner"))
    assert config.train.resume == "auto"
    assert _prepare_run("CS-Aligner", run_dir, config) is False
    assert (run_dir / "checkpoints").is_dir()


def test_an_unreadable_saved_config_is_an_error_not_a_deletion(tmp_path: Path) -> None:
    s = FlickrDemoSettings(out_dir=tmp_path)
    run_dir = _saved_run(tmp_path, s)
    (run_dir / "config.yaml").write_text("train: {epochs: [\n")
    with pytest.raises(ValueError, match=r"(?s)config.yaml could not be read .*remove .* to train that run again"):
        _prepare_run("CS-Aligner", run_dir, load_config(None, demo_overrides(s, CACHES, "cs_aligner")))
    assert (run_dir / "summary.json").is_file()


def test_bookkeeping_a_resume_may_change_does_not_retrain(tmp_path: Path) -> None:
    s = FlickrDemoSettings(out_dir=tmp_path)
    run_dir = _saved_run(tmp_path, s)
    config = load_config(None, [*demo_overrides(s, CACHES, "cs_aligner"), "train.log_every=50", "train.device=cpu"])
    assert config_changes(run_dir, config) == []


def test_the_infonce_run_sets_no_cs_term_settings_and_an_earlier_one_is_reused(tmp_path: Path) -> None:
    """The InfoNCE run was given the CS term's lam and sigma, which it ignored (and LossConfig now refuses);
    a run saved with them by an earlier version is the same run, not one to train again."""
    s = FlickrDemoSettings(out_dir=tmp_path, lam=0.5, sigma=0.8)
    config = load_config(None, demo_overrides(s, CACHES, "infonce"))
    assert (config.loss.lam, config.loss.sigma) == (0.01, 1.0)
    cs = load_config(None, demo_overrides(s, CACHES, "cs_aligner")).loss
    assert (cs.lam, cs.sigma) == (0.5, 0.8)
    run_dir = tmp_path / "infonce"
    run_dir.mkdir()
    saved = dump_yaml(config).replace("lam: 0.01", "lam: 0.5").replace("sigma: 1.0", "sigma: 0.8")
    assert "lam: 0.5" in saved and "sigma: 0.8" in saved
    (run_dir / "config.yaml").write_text(saved)
    (run_dir / "summary.json").write_text("{}")
    assert config_changes(run_dir, config) == []
    assert _prepare_run("InfoNCE only", run_dir, config) is True


def test_an_infonce_run_saved_with_unpaired_data_settings_is_reused(tmp_path: Path) -> None:
    """An earlier version accepted data settings for unpaired data under infonce and dropped them (as
    LossConfig's lam above); the saved run is the same as one configured without them."""
    s = FlickrDemoSettings(out_dir=tmp_path)
    config = load_config(None, demo_overrides(s, CACHES, "infonce"))
    run_dir = tmp_path / "infonce"
    run_dir.mkdir()
    saved = dump_yaml(config).replace("unpaired_batch_size: 0", "unpaired_batch_size: 512")
    saved = saved.replace("captions_per_image_in_cs: one", "captions_per_image_in_cs: all")
    assert "unpaired_batch_size: 512" in saved and "captions_per_image_in_cs: all" in saved
    (run_dir / "config.yaml").write_text(saved)
    (run_dir / "summary.json").write_text("{}")
    assert config_changes(run_dir, config) == []
    assert _prepare_run("InfoNCE only", run_dir, config) is True


def test_a_setting_dropped_as_ignored_is_shown_as_saved_when_it_changed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run saved under infonce with lam 0.5 (ignored, so dropped to 0.01): asked again as cs_aligner with lam 0.5,
    the retrain note shows the 0.5 the folder holds and that it was dropped, not a 0.01 it never saved."""
    s = FlickrDemoSettings(out_dir=tmp_path, lam=0.5)
    run_dir = tmp_path / "cs_aligner"
    run_dir.mkdir()
    saved = dump_yaml(load_config(None, demo_overrides(s, CACHES, "infonce"))).replace("lam: 0.01", "lam: 0.5")
    (run_dir / "config.yaml").write_text(saved)
    config = load_config(None, demo_overrides(s, CACHES, "cs_aligner"))
    expected = "loss.lam: 0.5 (stored, but objective 'infonce' ignored it: dropped to 0.01) -> 0.5"
    assert expected in config_changes(run_dir, config)
    assert _prepare_run("CS-Aligner", run_dir, config) is False
    assert expected in capsys.readouterr().out
