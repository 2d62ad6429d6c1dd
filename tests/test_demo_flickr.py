"""The real main job on a tiny Flickr8k subset: encode, train both objectives, evaluate, report.

Marked slow (real encoders, real images) but small enough to run in CI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from csaligner.cli import main
from csaligner.data import data_root

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        root = data_root()
    except FileNotFoundError as err:
        pytest.skip(f"shared data not available: {err}")
    if not (root / "flickr8k" / "captions.tsv").is_file():
        pytest.skip(f"Flickr8k not found under {root} (set CSALIGN_DATA)")
    out = tmp_path_factory.mktemp("demo")
    args = ["demo", "flickr", "--train-images", "60", "--dev-images", "30", "--epochs", "3"]
    assert main([*args, "--out", str(out / "runs"), "--cache", str(out / "cache")]) == 0
    return out


def test_demo_writes_report_metrics_and_preview(demo_dir: Path) -> None:
    runs = demo_dir / "runs"
    metrics = json.loads((runs / "metrics.json").read_text())
    assert set(metrics) == {"InfoNCE only", "CS-Aligner"}
    for m in metrics.values():
        assert 0.0 <= m["i2t_R@1"] <= m["i2t_R@5"] <= m["i2t_R@10"] <= 100.0
        assert 0.0 <= m["linear_separability"] <= 1.0 and m["cs_divergence"] >= 0.0
    report = (runs / "report.md").read_text()
    assert "CS-Aligner" in report and "projection.png" in report
    assert "trained on 60 Flickr8k train images" in report and "batch 60," in report  # not the 256 asked for
    for name in ("projection.png", "paired_distance.png", "preview/preview.png", "preview/preview.html"):
        assert (runs / name).stat().st_size > 1000, name
    assert (runs / "cs_aligner" / "text_adapter.safetensors").is_file()


def test_rerun_reuses_caches_and_runs(demo_dir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    args = ["demo", "flickr", "--train-images", "60", "--dev-images", "30", "--epochs", "3"]
    assert main([*args, "--out", str(demo_dir / "runs"), "--cache", str(demo_dir / "cache")]) == 0
    out, err = capfd.readouterr()
    assert "== training" not in out
    # Nothing is encoded or trained again: no progress bars (image checks, model loading) between the results.
    assert "Loading weights" not in err and "check images" not in err and "it/s" not in err, err


def test_eval_and_preview_show_no_model_loading_bars(demo_dir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Zero-shot and preview load the prompt encoder (MiniLM); transformers 5 drew a "Loading weights" bar there."""
    runs, cache = demo_dir / "runs", demo_dir / "cache"
    flowers = ["encode", "--quiet", "--encoder", "efficientnet-lite0", "--data", "flowers:test:10"]
    assert main([*flowers, "--out", str(cache / "quiet-test")]) == 0
    capfd.readouterr()
    rc = main([
        "eval", "--run", str(runs / "cs_aligner"), "--image-cache", str(cache / "flickr8k-dev-30-efficientnet-lite0"),
        "--text-cache", str(cache / "flickr8k-dev-30-minilm"), "--class-test-cache", str(cache / "quiet-test"),
        "--out", str(demo_dir / "eval_quiet"),
    ])  # fmt: skip
    assert rc == 0
    prompts = demo_dir / "quiet_prompts.txt"
    prompts.write_text("a dog runs on the grass\n")
    rc = main([
        "preview", "--run", f"cs={runs / 'cs_aligner'}", "--image-cache",
        str(cache / "flickr8k-dev-30-efficientnet-lite0"), "--prompts", str(prompts), "--out", str(demo_dir / "pq"),
    ])  # fmt: skip
    assert rc == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err, err
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()  # switched off for the commands only


def test_eval_cli_on_demo_runs(demo_dir: Path) -> None:
    runs, cache = demo_dir / "runs", demo_dir / "cache"
    rc = main([
        "eval", "--run", f"a={runs / 'infonce'}", "--run", f"b={runs / 'cs_aligner'}",
        "--image-cache", str(cache / "flickr8k-dev-30-efficientnet-lite0"),
        "--text-cache", str(cache / "flickr8k-dev-30-minilm"), "--out", str(demo_dir / "eval"),
    ])  # fmt: skip
    assert rc == 0
    saved = json.loads((demo_dir / "eval" / "metrics.json").read_text())
    assert set(saved) == {"a", "b"} and "rsum" in saved["a"]
    assert main(["eval", "--run", str(demo_dir), "--image-cache", "x", "--text-cache", "y"]) == 1


def test_preview_cli_from_runs_with_free_text_prompts(demo_dir: Path) -> None:
    runs, cache = demo_dir / "runs", demo_dir / "cache"
    prompts = demo_dir / "prompts.txt"
    prompts.write_text("a dog runs on the grass\nchildren playing in the water\n")
    out = demo_dir / "preview_cli"
    rc = main([
        "preview", "--run", f"InfoNCE only={runs / 'infonce'}", "--run", f"CS-Aligner={runs / 'cs_aligner'}",
        "--image-cache", str(cache / "flickr8k-dev-30-efficientnet-lite0"), "--prompts", str(prompts),
        "--out", str(out), "-k", "3",
    ])  # fmt: skip
    assert rc == 0
    html = (out / "preview.html").read_text()
    assert "children playing in the water" in html and "CS-Aligner" in html
    assert (out / "preview.png").stat().st_size > 1000


def test_eval_cli_zero_and_few_shot_on_flowers(demo_dir: Path) -> None:
    cache = demo_dir / "cache"
    for split, n in (("train", 80), ("test", 20)):  # round robin over the 5 classes: 16 train images each
        spec = f"flowers:{split}:{n}"
        assert main(["encode", "--encoder", "efficientnet-lite0", "--data", spec, "--out", str(cache / split)]) == 0
    out = demo_dir / "eval_flowers"
    rc = main([
        "eval", "--run", str(demo_dir / "runs" / "cs_aligner"),
        "--image-cache", str(cache / "flickr8k-dev-30-efficientnet-lite0"),
        "--text-cache", str(cache / "flickr8k-dev-30-minilm"),
        "--class-train-cache", str(cache / "train"), "--class-test-cache", str(cache / "test"), "--out", str(out),
    ])  # fmt: skip
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())["cs_aligner"]
    assert 0.0 <= m["zero_shot_top1"] <= 100.0 and 0.0 <= m["few_shot_16-shot"] <= 100.0
    assert "zero_shot_top1" in (out / "report.md").read_text()


def test_rerun_with_other_settings_trains_again(demo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Last in this module: it replaces the runs the tests above read."""
    runs = demo_dir / "runs"
    args = ["demo", "flickr", "--train-images", "60", "--dev-images", "30", "--epochs", "4"]
    assert main([*args, "--out", str(runs), "--cache", str(demo_dir / "cache")]) == 0
    out = capsys.readouterr().out
    assert "train.epochs: 3 -> 4" in out and "== training CS-Aligner ==" in out
    assert "epochs: 4" in (runs / "cs_aligner" / "config.yaml").read_text()
    assert "4 epochs" in (runs / "report.md").read_text()
