"""`csalign demo toy` end to end at small size: files written, numbers inside them sensible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from csaligner.cli import main
from csaligner.demo import ToySettings, run_toy


def test_toy_demo_cs_aligner_narrows_the_gap(tmp_path: Path) -> None:
    metrics = run_toy(tmp_path, ToySettings(n_train=600, n_test=300, steps=120, batch_size=128))
    before, infonce, cs = metrics["before (raw features)"], metrics["InfoNCE only"], metrics["CS-Aligner"]
    assert cs["cs_divergence"] < infonce["cs_divergence"] < before["cs_divergence"]
    assert cs["centroid_distance"] < before["centroid_distance"]
    assert (tmp_path / "toy_projection.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "toy_metrics.json").read_text())
    assert round(saved["appendix_b"]["mutual_information"], 3) == 1.959


def test_cli_without_command_prints_help(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["demo", "--train-images", "-5"], "--train-images must be an integer >= 0 (0 = the whole split), got -5"),
        (["demo", "--dev-images", "-1"], "--dev-images must be an integer >= 0"),
        (["demo", "--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
        (["demo", "toy", "--epochs", "3", "--cache", "c"], "--epochs, --cache size the flickr demo"),
    ],
)
def test_bad_demo_flags_are_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    assert main([*args, "--out", str(tmp_path / "out")]) == 1
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing encoded, trained or written
