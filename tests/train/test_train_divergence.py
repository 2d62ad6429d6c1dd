"""A diverging run is reported as a divergence, with the settings to change, not blamed on the data."""

from __future__ import annotations

from pathlib import Path

import pytest

from csaligner.train import load_config, train

from .helpers import fast_overrides, synthetic_features


def test_exploding_adapters_are_reported_as_divergence(tmp_path: Path) -> None:
    # An absurd learning rate without clipping: the adapters' outputs overflow within a few steps.
    cfg = load_config(None, fast_overrides(tmp_path / "run", "train.lr=1e6", "train.grad_clip=0", "train.steps=40"))
    with pytest.raises(FloatingPointError) as info:
        train(cfg, synthetic_features())
    message = str(info.value)
    assert message.startswith("step ") and " of 40: the adapters' " in message
    assert "training diverged" in message and "lower train.lr (now 1e+06)" in message
    assert "train.grad_clip=1.0" in message
    assert "corrupt image" not in message  # the frozen features were fine


def test_nan_in_the_frozen_features_is_still_a_data_error() -> None:
    feats = synthetic_features()
    feats.image[3, 0] = float("nan")
    with pytest.raises(ValueError, match="image contains NaN or Inf in 1 of 48 feature vectors"):
        type(feats)(image=feats.image, text=feats.text, text_to_image=feats.text_to_image, image_ids=feats.image_ids)


def test_cli_reports_divergence_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import csaligner.data
    from csaligner.cli import main

    (tmp_path / "img").mkdir()
    (tmp_path / "txt").mkdir()
    monkeypatch.setattr(csaligner.data, "load_paired_features", lambda *_: synthetic_features(), raising=False)
    caches = [f"--data.image_cache={tmp_path}/img", f"--data.text_cache={tmp_path}/txt"]
    overrides = fast_overrides(tmp_path / "run", "train.lr=1e6", "train.grad_clip=0", "train.steps=40")
    assert main(["train", *caches, *(f"--{o}" for o in overrides)]) == 1  # not a FloatingPointError traceback
    err = capsys.readouterr().err
    assert err.startswith("csalign train: error: step ") and "training diverged" in err
