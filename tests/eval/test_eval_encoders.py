"""A run records the encoders of its training features; eval refuses features (paired or class) from others."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from tests.eval.tiny_runs import (
    TinyCaches,
    class_caches,
    count_cache_json_reads,
    make_run,
    other_tiny_encoders,
    tiny_caches,
)
from tests.train.helpers import fast_overrides, synthetic_features

from csaligner.cli import main
from csaligner.decode.preview_runs import run_text_encoder
from csaligner.eval.evaluate import classification_metrics, evaluate_run, load_classification
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


# Classification: the class-folder image caches and the prompt encoder are checked like the paired features.

TINY = {"image_encoder": "tiny-image@seed0-v1", "text_encoder": "tiny-text@seed0-b512-v1"}
"""The ids the tiny encoders give their caches (what a run trained on tiny caches records)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyCaches, tuple[Path, Path], tuple[Path, Path]]:
    """Paired tiny caches, class caches from tiny-image, and same-width class caches from tiny-image-b."""
    root = tmp_path_factory.mktemp("tiny")
    with other_tiny_encoders():
        other = class_caches(root / "other", encoder="tiny-image-b")
    return tiny_caches(root / "paired"), class_caches(root / "same"), other


def eval_cli(caches: TinyCaches, classes: tuple[Path, Path], run: Path, out: Path) -> int:
    args = ["eval", "--run", str(run), "--image-cache", str(caches.image), "--text-cache", str(caches.text_tokens)]
    args += ["--class-train-cache", str(classes[0]), "--class-test-cache", str(classes[1]), "--shots", "1,4"]
    return main([*args, "--out", str(out)])


def test_classification_on_caches_from_the_run_encoders_runs(tiny: Any, tmp_path: Path) -> None:
    caches, same, _ = tiny
    run = make_run(tmp_path / "run", caches.text_tokens, encoders=TINY)
    data = load_classification(*same, "tiny-text")
    assert data.image_encoder == TINY["image_encoder"]
    assert "zero_shot_top1" in classification_metrics(run, data, shots=(1,))
    assert eval_cli(caches, same, run, tmp_path / "out") == 0
    assert "few_shot_4-shot" in json.loads((tmp_path / "out" / "metrics.json").read_text())["run"]


def test_eval_reads_each_cache_once(tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prompt encoder's spec and id come from the text cache already opened; class caches open once each."""
    caches, same, _ = tiny
    run = make_run(tmp_path / "run", caches.text_tokens, encoders=TINY)
    reads = count_cache_json_reads(monkeypatch)
    assert eval_cli(caches, same, run, tmp_path / "out") == 0
    assert reads == {p.resolve(): 1 for p in (caches.image, caches.text_tokens, *same)}


def test_classification_refuses_class_caches_from_another_image_encoder(
    tiny: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    caches, _, other = tiny
    run = make_run(tmp_path / "run", caches.text_tokens, encoders=TINY)
    data = load_classification(*other, "tiny-text")
    want = r"trained on image features from 'tiny-image@seed0-v1'.*classification image cache.*'tiny-image-b@seed1-v1'"
    with pytest.raises(ValueError, match=want):
        classification_metrics(run, data, shots=(1,))
    assert eval_cli(caches, other, run, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "'tiny-image-b@seed1-v1'" in err and "csalign encode --encoder tiny-image " in err
    assert not (tmp_path / "out" / "metrics.json").exists()  # refused before any run was evaluated


def test_classification_refuses_prompts_from_another_text_encoder(tiny: Any, tmp_path: Path) -> None:
    caches, same, _ = tiny
    run = make_run(tmp_path / "run", caches.text_tokens, encoders=TINY)
    with pytest.raises(ValueError, match=r"trained on text features from 'tiny-text@seed0-b512-v1'.*'tiny-text-b'"):
        classification_metrics(run, load_classification(*same, "tiny-text-b"), shots=(1,))


def test_classification_of_a_run_without_a_record_is_not_checked(tiny: Any, tmp_path: Path) -> None:
    caches, _, other = tiny
    run = make_run(tmp_path / "run", caches.text_tokens)  # trained before runs recorded their encoders
    assert "zero_shot_top1" in classification_metrics(run, load_classification(*other, "tiny-text"), shots=(1,))


def test_class_train_and_test_caches_from_different_encoders_are_refused(tiny: Any) -> None:
    _, same, other = tiny
    want = r"encoded with different image encoders \('tiny-image@seed0-v1' vs 'tiny-image-b@seed1-v1'\)"
    with pytest.raises(ValueError, match=want):
        load_classification(same[0], other[1], "tiny-text")
