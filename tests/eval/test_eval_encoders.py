"""A run records the encoders of its training features; eval refuses features from others."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from tests.train.helpers import fast_overrides, synthetic_features

from csaligner.decode.preview_runs import run_text_encoder
from csaligner.eval.evaluate import evaluate_run
from csaligner.train import load_config, train

META = {"image_encoder": "efficientnet-lite0@c1735589", "text_encoder": "minilm@4b8c5d5e-l2"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("enc") / "run"
    feats = dataclasses.replace(synthetic_features(), meta=dict(META))
    train(load_config(None, fast_overrides(out, "train.steps=3")), feats)
    return out


def test_training_records_the_encoders(run_dir: Path) -> None:
    assert json.loads((run_dir / "encoders.json").read_text()) == META
    assert run_text_encoder(run_dir) == "minilm"  # without reopening the training cache


def test_eval_on_features_from_the_same_encoders_runs(run_dir: Path) -> None:
    feats = dataclasses.replace(synthetic_features(seed=1), meta=dict(META))
    assert "rsum" in evaluate_run(run_dir, feats)


def test_eval_refuses_a_same_width_cache_from_another_text_encoder(run_dir: Path) -> None:
    feats = dataclasses.replace(synthetic_features(seed=1), meta={**META, "text_encoder": "hf-text@4b8c5d5e"})
    with pytest.raises(ValueError, match=r"trained on text features from 'minilm@4b8c5d5e-l2'.*'hf-text@4b8c5d5e'"):
        evaluate_run(run_dir, feats)


def test_features_without_provenance_are_not_checked(run_dir: Path) -> None:
    assert "rsum" in evaluate_run(run_dir, synthetic_features(seed=1))  # meta {}: a library caller's tensors


def test_a_later_run_without_provenance_drops_the_stale_record(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(load_config(None, fast_overrides(out, "train.steps=2")), dataclasses.replace(synthetic_features(), meta=META))
    assert (out / "encoders.json").is_file()
    again = fast_overrides(out, "train.steps=2", "train.overwrite=true")
    train(load_config(None, again), synthetic_features())
    assert not (out / "encoders.json").exists()
