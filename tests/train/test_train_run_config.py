"""A run folder's config.yaml trains again as its header says, also when an earlier version wrote settings there
that the run ignored and that are refused now: they are dropped, with a note naming them."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

import csaligner.data
from csaligner.cli import main
from csaligner.data.features import PairedFeatures
from csaligner.train import load_config, train
from tests.train.helpers import fast_overrides, synthetic_features

NOTE = "was written by an earlier version with settings the run ignored, which are refused now; it loads as the run "
DROPPED = "data.token_images=0 (stored: 64), loss.lam=0.01 (stored: 0.5), model.text.mlp_ratio left out (stored: 2)"


@pytest.fixture
def old_run(tmp_path: Path, features: PairedFeatures, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An infonce run (linear text adapter) whose config.yaml holds lam, token_images and mlp_ratio as an earlier
    version wrote them: accepted, ignored by the run, refused now. Its caches load synthetic features."""
    for name in ("img", "txt"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(csaligner.data, "load_paired_features", lambda *_: synthetic_features(), raising=False)
    caches = [f"data.image_cache={tmp_path / 'img'}", f"data.text_cache={tmp_path / 'txt'}"]
    run = tmp_path / "run"
    overrides = fast_overrides(run, "train.steps=2", "loss.objective=infonce", "model.text={kind: linear}", *caches)
    train(load_config(None, overrides), features)
    path = run / "config.yaml"
    header, *_ = path.read_text().splitlines()
    config = yaml.safe_load(path.read_text())
    config["loss"]["lam"], config["data"]["token_images"], config["model"]["text"]["mlp_ratio"] = 0.5, 64, 2
    path.write_text(f"{header}\n{yaml.safe_dump(config, sort_keys=False)}")
    return run


def test_the_headers_command_trains_a_folder_written_with_settings_refused_now(
    old_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    header = (old_run / "config.yaml").read_text().splitlines()[0]
    command = shlex.split(header.partition("train it again: ")[2])
    assert command[:2] == ["csalign", "train"]
    assert main([*command[1:], "--train.progress=false"]) == 0
    err = capsys.readouterr().err
    assert f"csalign train: note: {old_run}/config.yaml {NOTE}trained: {DROPPED}." in err
    again = load_config(f"{old_run}-2/config.yaml")  # the new run's record holds what it trained with
    assert (again.loss.lam, again.data.token_images, again.model.text) == (0.01, 0, {"kind": "linear"})


def test_print_config_keeps_the_note_out_of_the_yaml(old_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", str(old_run / "config.yaml"), "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["loss"]["lam"] == 0.01 and "note" not in out
    assert NOTE in err


def test_loading_it_in_python_warns_with_the_same_note(old_run: Path) -> None:
    with pytest.warns(UserWarning, match="model.text.mlp_ratio left out") as record:
        config = load_config(old_run / "config.yaml")
    assert (config.loss.lam, config.data.token_images, config.model.text) == (0.01, 0, {"kind": "linear"})
    assert NOTE in str(record[0].message)
    notes: list[str] = []
    load_config(old_run / "config.yaml", report=notes.append)
    assert len(notes) == 1 and DROPPED in notes[0]


def test_overrides_apply_to_the_run_as_it_trained(old_run: Path) -> None:
    """The file is dropped to what the run did first; a flag on top is a setting of the new run, checked as such."""
    with pytest.warns(UserWarning):
        config = load_config(old_run / "config.yaml", ["loss.objective=cs_aligner", "loss.lam=0.5"])
    assert (config.loss.objective, config.loss.lam) == ("cs_aligner", 0.5)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"lam=0\.25 would be ignored"):
        load_config(old_run / "config.yaml", ["loss.lam=0.25"])


def test_a_file_that_is_no_run_record_is_still_refused(old_run: Path, tmp_path: Path) -> None:
    """A preset (no run header) with a setting its run would ignore is a mistake to fix, not a record to honour."""
    preset = tmp_path / "preset.yaml"
    preset.write_text("\n".join((old_run / "config.yaml").read_text().splitlines()[1:]))
    with pytest.raises(ValueError, match=r"model\.text\.mlp_ratio=\S+ .*does not apply to kind='linear'"):
        load_config(preset)


def test_a_run_config_holding_nothing_refused_loads_without_a_note(tmp_path: Path, features: PairedFeatures) -> None:
    train(load_config(None, fast_overrides(tmp_path, "train.steps=1", "loss.objective=infonce")), features)
    notes: list[str] = []
    assert load_config(tmp_path / "config.yaml", report=notes.append).loss.objective == "infonce"
    assert notes == []
