"""`csalign demo toy` end to end at small size: files written, numbers inside them sensible."""

from __future__ import annotations

import json
from pathlib import Path

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
