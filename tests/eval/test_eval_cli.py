"""`csalign eval` end to end on tiny caches: token-conditioned runs, run names, --shots, report columns."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tests.eval.tiny_runs import TinyCaches, make_run

from csaligner.cli import main
from csaligner.data import load_paired_features
from csaligner.eval.retrieval import retrieval_metrics
from csaligner.train import embed
from csaligner.train.model import load_adapters


def evaluate(caches: TinyCaches, out: Path, *runs: str, text: Path | None = None, extra: tuple[str, ...] = ()) -> int:
    args = ["eval", "--image-cache", str(caches.image), "--text-cache", str(text or caches.text_tokens)]
    for run in runs:
        args += ["--run", run]
    return main([*args, "--out", str(out), *extra])


def test_embed_refuses_a_token_run_without_tokens(caches: TinyCaches, tmp_path: Path) -> None:
    run = make_run(tmp_path / "tok", caches.text_tokens)
    pooled_only = load_paired_features(caches.image, caches.text)
    with pytest.raises(ValueError, match=r"run .*tok was trained with text tokens.*--tokens"):
        embed(pooled_only, str(run))
    feats = load_paired_features(caches.image, caches.text_tokens)
    _, text = embed(feats, str(run), normalize=False)
    adapter = load_adapters(str(run)).text
    with torch.no_grad():
        want = adapter(feats.text, text_tokens=feats.text_tokens, text_token_mask=feats.text_token_mask)
        pooled = adapter(feats.text)
    torch.testing.assert_close(text, want)
    assert (text - pooled).abs().max() > 1e-4  # the tokens matter, so dropping them would show


def test_a_pooled_only_text_adapter_needs_no_tokens(caches: TinyCaches, tmp_path: Path) -> None:
    """use_tokens=true with an mlp text adapter (tokens fed only the token-level loss): it was trained on pooled."""
    run = make_run(tmp_path / "mlp", caches.text_tokens, text_kind="mlp")
    _, text = embed(load_paired_features(caches.image, caches.text), str(run))
    assert text.shape == (20, 12)


def test_eval_cli_refuses_a_pooled_cache_for_a_token_run(
    caches: TinyCaches, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run(tmp_path / "tok", caches.text_tokens)
    assert evaluate(caches, tmp_path / "bad", str(run), text=caches.text) == 1
    err = capsys.readouterr().err
    assert str(run) in err and "encode the eval text cache with --tokens" in err
    assert not (tmp_path / "bad" / "metrics.json").exists()
    assert evaluate(caches, tmp_path / "good", str(run)) == 0
    got = json.loads((tmp_path / "good" / "metrics.json").read_text())["tok"]
    feats = load_paired_features(caches.image, caches.text_tokens)
    want = retrieval_metrics(*embed(feats, str(run)), feats.text_to_image)
    assert got["rsum"] == pytest.approx(want["rsum"])


def test_zero_shot_prompts_are_encoded_with_tokens(
    caches: TinyCaches,
    classes: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    zero_shot_prompts: list[torch.Tensor],
) -> None:
    import csaligner.eval.evaluate as evaluate_module
    from csaligner.encoders import get_encoder
    from csaligner.eval.classification import class_prompts

    run = make_run(tmp_path / "tok", caches.text_tokens)
    seen = zero_shot_prompts
    monkeypatch.setattr(evaluate_module, "few_shot_accuracy", lambda *args, **kwargs: {})  # not under test
    data = evaluate_module.load_classification(*classes, "tiny-text")
    evaluate_module.classification_metrics(run, data)
    prompts = [p for per_class in class_prompts(data.class_names) for p in per_class]
    enc = get_encoder("tiny-text").encode_texts(prompts, tokens=True)
    with torch.no_grad():
        want = load_adapters(str(run)).text(enc.pooled, text_tokens=enc.tokens, text_token_mask=enc.mask)
    torch.testing.assert_close(seen[0].flatten(0, 1), F.normalize(want, dim=-1))


def test_zero_shot_uses_the_given_templates(
    caches: TinyCaches, classes: tuple[Path, Path], tmp_path: Path, zero_shot_prompts: list[torch.Tensor]
) -> None:
    """One template gives (C, 1, D) class prompts: exactly that template's prompts, not the default ensemble."""
    import csaligner.eval.evaluate as evaluate_module
    from csaligner.encoders import get_encoder
    from csaligner.eval.classification import DEFAULT_TEMPLATES

    run = make_run(tmp_path / "tok", caches.text_tokens)
    seen = zero_shot_prompts
    data = evaluate_module.load_classification(*classes, "tiny-text")
    template = "a photo of a {}, a type of flower."
    got = evaluate_module.classification_metrics(run, data, shots=(1,), templates=(template,))
    evaluate_module.classification_metrics(run, data, shots=(1,))  # the default: CLIP's ensemble
    assert seen[0].shape[:2] == (len(data.class_names), 1)
    assert seen[1].shape[:2] == (len(data.class_names), len(DEFAULT_TEMPLATES))
    enc = get_encoder("tiny-text").encode_texts([template.format(n) for n in data.class_names], tokens=True)
    with torch.no_grad():
        want = load_adapters(str(run)).text(enc.pooled, text_tokens=enc.tokens, text_token_mask=enc.mask)
    torch.testing.assert_close(seen[0][:, 0], F.normalize(want, dim=-1))
    assert set(got) >= {"zero_shot_top1", "zero_shot_mean_per_class", "few_shot_1-shot"}
    with pytest.raises(ValueError, match=r'exactly one "\{\}"'):
        evaluate_module.classification_metrics(run, data, shots=(1,), templates=("a photo of a flower.",))


def test_duplicate_run_names_are_refused(
    caches: TinyCaches, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from csaligner.eval.cli import parse_runs

    run = make_run(tmp_path / "runs" / "a", caches.text_tokens)
    other = tmp_path / "other" / "a"
    shutil.copytree(run, other)
    with pytest.raises(ValueError, match=r"two runs are named 'a'.*NAME=DIR.*--run a-1="):
        parse_runs([str(run), str(other)])
    assert evaluate(caches, tmp_path / "dup", str(run), str(other)) == 1
    assert "NAME=DIR" in capsys.readouterr().err
    assert list(parse_runs([f"mine={run}", f"theirs={other}"])) == ["mine", "theirs"]
    assert list(parse_runs([f"lam=0.1={run}"])) == ["lam=0.1"]  # the folder follows the last "="


def test_shots_flag(
    caches: TinyCaches, classes: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run(tmp_path / "tok", caches.text_tokens)
    train, test = classes
    cls = ("--class-train-cache", str(train), "--class-test-cache", str(test))
    assert evaluate(caches, tmp_path / "default", str(run), extra=cls) == 1  # default 1,4,16 > 4 images a class
    err = capsys.readouterr().err
    assert "--shots 1,4,16 needs 16 training images per class" in err and "e.g. --shots 1,4" in err
    assert not (tmp_path / "default" / "metrics.json").exists()  # refused before any run was evaluated
    assert evaluate(caches, tmp_path / "ok", str(run), extra=(*cls, "--shots", "4,1")) == 0
    metrics = json.loads((tmp_path / "ok" / "metrics.json").read_text())["tok"]
    assert {"few_shot_1-shot", "few_shot_4-shot"} <= set(metrics) and "few_shot_16-shot" not in metrics
    table = json.loads((tmp_path / "ok" / "report.json").read_text())["sections"][0]["table"]["tok"]
    assert "few_shot_4-shot" in table and "zero_shot_top1" in table


def test_report_shows_few_shot_mean_and_std_over_seeds(
    caches: TinyCaches, classes: tuple[Path, Path], tmp_path: Path
) -> None:
    """metrics.json has few_shot_k-shot_std; the report shows it beside the mean, with the seed count."""
    run = make_run(tmp_path / "tok", caches.text_tokens)
    cls = ("--class-train-cache", str(classes[0]), "--class-test-cache", str(classes[1]), "--shots", "1,4")
    assert evaluate(caches, tmp_path / "out", str(run), extra=cls) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["tok"]
    section = json.loads((tmp_path / "out" / "report.json").read_text())["sections"][0]
    for k in ("few_shot_1-shot", "few_shot_4-shot"):
        assert section["table"]["tok"][k] == {"mean": metrics[k], "std": metrics[f"{k}_std"], "n": 3}
    assert "mean ± sample std over 3 seeds (0, 1, 2)" in section["text"]
    md = (tmp_path / "out" / "report.md").read_text()
    mean, std = metrics["few_shot_1-shot"], metrics["few_shot_1-shot_std"]
    assert f"| {mean:.2f} ± {std:.2f} |" in md
    assert f"| {metrics['zero_shot_top1']:.2f} |" in md  # one number: no ±


def test_report_says_which_caches_each_column_came_from(
    caches: TinyCaches, classes: tuple[Path, Path], tmp_path: Path
) -> None:
    run = make_run(tmp_path / "tok", caches.text_tokens)
    train, test = classes
    cls = ("--class-train-cache", str(train), "--class-test-cache", str(test), "--shots", "1,4")
    assert evaluate(caches, tmp_path / "out", str(run), extra=cls) == 0
    sources = json.loads((tmp_path / "out" / "report.json").read_text())["sections"][0]["sources"]
    assert sources == {
        "retrieval, gap: images": {"cache": str(caches.image), "images": 10},
        "retrieval, gap: captions": {"cache": str(caches.text_tokens), "captions": 20},
        "zero-shot, few-shot: test": {"cache": str(test), "images": 6, "classes": 3},  # 2 a class
        "few-shot: train": {"cache": str(train), "images": 13, "classes": 3, "shots": "1,4", "seeds": "0,1,2"},
        "zero-shot: prompts": {"templates": "clip-imagenet-7 (7 templates)", "class names": "folder names"},
    }
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"| few-shot: train | {train} | 13 | – | 3 | 1,4 | 0,1,2 | – | – |" in md
    assert evaluate(caches, tmp_path / "paired", str(run)) == 0  # no class caches: no classification rows
    sources = json.loads((tmp_path / "paired" / "report.json").read_text())["sections"][0]["sources"]
    assert list(sources) == ["retrieval, gap: images", "retrieval, gap: captions"]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (("--shots", "1,4"), "from --class-train-cache: pass it and --class-test-cache, or drop --shots"),
        (("--templates", "flowers102", "--class-names", "a=b"), "--templates and --class-names shape the zero-shot"),
        (("--class-names", "a=b"), "--class-names shapes the zero-shot prompts; pass --class-test-cache too"),
    ],
)
def test_classification_flags_without_class_caches_are_refused(
    caches: TinyCaches, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], expected: str
) -> None:
    run = make_run(tmp_path / "tok", caches.text_tokens)
    assert evaluate(caches, tmp_path / "out", str(run), extra=extra) == 1
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_zero_shot_needs_only_the_test_cache(
    caches: TinyCaches, classes: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Zero-shot scores prompts against the test images alone; few-shot columns and sources are left out."""
    run = make_run(tmp_path / "tok", caches.text_tokens)
    test = classes[1]
    assert evaluate(caches, tmp_path / "out", str(run), extra=("--class-test-cache", str(test))) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["tok"]
    assert "zero_shot_top1" in metrics and not any(k.startswith("few_shot") for k in metrics)
    section = json.loads((tmp_path / "out" / "report.json").read_text())["sections"][0]
    assert "zero_shot_top1" in section["table"]["tok"]
    assert section["sources"]["zero-shot: test"] == {"cache": str(test), "images": 6, "classes": 3}
    assert "few-shot: train" not in section["sources"] and "Zero-shot only" in section["text"]
    both = ("--class-train-cache", str(classes[0]), "--class-test-cache", str(test), "--shots", "1")
    assert evaluate(caches, tmp_path / "both", str(run), extra=both) == 0  # the same zero-shot number with few-shot
    with_train = json.loads((tmp_path / "both" / "metrics.json").read_text())["tok"]
    assert with_train["zero_shot_top1"] == metrics["zero_shot_top1"] and "few_shot_1-shot" in with_train


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (("--class-train-cache", "TRAIN"), "scored on --class-test-cache: pass it too"),
        (("--class-test-cache", "TEST", "--shots", "1"), "pass it, or drop --shots (zero-shot needs only"),
    ],
)
def test_few_shot_without_both_caches_is_refused(
    caches: TinyCaches,
    classes: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...],
    expected: str,
) -> None:
    run = make_run(tmp_path / "tok", caches.text_tokens)
    named = {"TRAIN": str(classes[0]), "TEST": str(classes[1])}
    assert evaluate(caches, tmp_path / "out", str(run), extra=tuple(named.get(a, a) for a in extra)) == 1
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("text", ["", "1,x", "0,4", "1,,4"])
def test_parse_shots_rejects(text: str) -> None:
    from csaligner.eval.cli import parse_shots

    with pytest.raises(argparse.ArgumentTypeError, match="--shots takes comma-separated integers"):
        parse_shots(text)
    assert parse_shots("16,1,4,4") == (1, 4, 16)


def test_report_shows_every_recall_that_rsum_adds(caches: TinyCaches, tmp_path: Path) -> None:
    run = make_run(tmp_path / "tok", caches.text_tokens)
    assert evaluate(caches, tmp_path / "out", str(run)) == 0
    row = json.loads((tmp_path / "out" / "report.json").read_text())["sections"][0]["table"]["tok"]
    recalls = [row[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert sum(recalls) == pytest.approx(row["rsum"])
    assert "| i2t_R@10 |" in (tmp_path / "out" / "report.md").read_text()


def test_eval_on_the_training_data_says_so(
    caches: TinyCaches, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "seen"
    train = ["train", f"--data.image_cache={caches.image}", f"--data.text_cache={caches.text}", "--train.steps=2"]
    train += ["--train.batch_size=4", "--train.progress=false", "--train.tensorboard=false", f"--train.out_dir={run}"]
    assert main(train) == 0
    capsys.readouterr()
    assert evaluate(caches, tmp_path / "out", f"seen={run}", text=caches.text) == 0
    err = capsys.readouterr().err
    assert "warning: seen was trained on these very images and captions" in err
    assert "**Warning:** seen was trained on these very images" in (tmp_path / "out" / "report.md").read_text()
    hand_built = make_run(tmp_path / "tok", caches.text_tokens)  # no record of its data: nothing to compare
    assert evaluate(caches, tmp_path / "out2", str(hand_built)) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_run_with_a_damaged_config_is_named(
    caches: TinyCaches, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run(tmp_path / "tok", caches.text_tokens)
    (run / "config.yaml").write_text(": bad: [yaml\n")
    assert evaluate(caches, tmp_path / "out", str(run)) == 1
    assert f"{run / 'config.yaml'} is not valid YAML (line 1, column 1" in capsys.readouterr().err


def test_check_shots_counts_classes_without_training_images() -> None:
    from csaligner.eval.cli import check_shots
    from csaligner.eval.evaluate import ClassificationData

    x = torch.randn(4, 3)
    data = ClassificationData(x, torch.tensor([0, 0, 2, 2]), x, torch.tensor([0, 1, 2, 2]), ["a", "b", "c"], "t")
    with pytest.raises(ValueError, match=r"class\(es\) \['b'\] of tr have no training image"):
        check_shots(data, (1,), "tr")
    ok = ClassificationData(x, torch.tensor([0, 1, 2, 2]), x, torch.tensor([0, 1, 2, 2]), ["a", "b", "c"], "t")
    check_shots(ok, (1,), "tr")
    with pytest.raises(ValueError, match=r"needs 2 training images per class, but 2 class\(es\)"):
        check_shots(ok, (1, 2), "tr")


def test_eval_repeats_the_warnings_train_recorded(
    caches: TinyCaches, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A degenerate run's summary.json warnings used to stay there: eval printed its numbers as results."""
    run = make_run(tmp_path / "flat", caches.text_tokens)
    recorded = ["training went degenerate: loss is nan at step 3. Lower --train.lr.", "a second warning"]
    (run / "summary.json").write_text(json.dumps({"step": 4, "warnings": recorded}))
    quiet = make_run(tmp_path / "quiet", caches.text_tokens)
    assert evaluate(caches, tmp_path / "out", str(run), str(quiet)) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("csalign eval: warning: ")]
    assert lines == [f"csalign eval: warning: flat: csalign train warned: {w}" for w in recorded]
    md = (tmp_path / "out" / "report.md").read_text()
    text = json.loads((tmp_path / "out" / "report.json").read_text())["sections"][0]["text"]
    for w in recorded:
        assert f"**Warning:** flat: csalign train warned: {w}" in md
        assert f"flat: csalign train warned: {w}" in text
    assert "quiet:" not in err


def test_a_run_folder_that_does_not_exist_is_named_as_missing(tmp_path: Path) -> None:
    """It was "is not a finished training run (no config.yaml)", as if the folder were there."""
    from csaligner.eval.cli import parse_runs

    with pytest.raises(FileNotFoundError, match=r"run folder .*nope does not exist; pass the train.out_dir"):
        parse_runs([str(tmp_path / "nope")])
    # a folder holding "=" is split at the last "=": say how the spec was read
    with pytest.raises(FileNotFoundError, match=r"read as NAME=.*lam, DIR=0\.1\)"):
        parse_runs([str(tmp_path / "lam=0.1")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a finished training run"):
        parse_runs([str(tmp_path / "empty")])


def test_the_zero_shot_notes_are_not_run_into_a_bold_warning(
    caches: TinyCaches, classes: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The notes were appended after the last warning, so they read as part of "**Warning:** ..."."""
    run = tmp_path / "seen"
    train = ["train", f"--data.image_cache={caches.image}", f"--data.text_cache={caches.text}", "--train.steps=2"]
    train += ["--train.batch_size=4", "--train.progress=false", "--train.tensorboard=false", f"--train.out_dir={run}"]
    assert main(train) == 0
    extra = ("--class-test-cache", str(classes[1]))
    assert evaluate(caches, tmp_path / "out", f"seen={run}", text=caches.text, extra=extra) == 0
    text = json.loads((tmp_path / "out" / "report.json").read_text())["sections"][0]["text"]
    paragraphs = text.split("\n\n")
    assert "Zero-shot only" in paragraphs[0] and "Zero-shot prompts average" in paragraphs[0]
    assert paragraphs[1].startswith("**Warning:** seen was trained on these very images")
    assert "Zero-shot" not in paragraphs[1]


def test_the_report_says_how_to_read_its_columns(caches: TinyCaches, tmp_path: Path) -> None:
    """ "linear_separability 0.90" or "cs_divergence 0.017" gave a new user no direction to read them in."""
    run = make_run(tmp_path / "tok", caches.text_tokens)
    assert evaluate(caches, tmp_path / "out", str(run)) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "recall in % (higher is better" in md and "lower = smaller gap" in md and "0.5 = indistinguishable" in md


def test_a_token_run_without_tokens_names_its_own_text_encoder_in_the_fix(caches: TinyCaches, tmp_path: Path) -> None:
    """The fix read "csalign encode --encoder ... --tokens" though encoders.json says which encoder."""
    pooled_only = load_paired_features(caches.image, caches.text)
    recorded = {"text_encoder": "tiny-text@x", "text_encoder_spec": "tiny-text"}
    run = make_run(tmp_path / "tok", caches.text_tokens, encoders=recorded)
    with pytest.raises(ValueError, match=r"\(csalign encode --encoder tiny-text --data DATA --out DIR --tokens\)$"):
        embed(pooled_only, str(run))
    bare = make_run(tmp_path / "bare", caches.text_tokens)  # no encoders.json: the generic fix
    with pytest.raises(ValueError, match=r"\(csalign encode --encoder \.\.\. --tokens\)$"):
        embed(pooled_only, str(bare))
