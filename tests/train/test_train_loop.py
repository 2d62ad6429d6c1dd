from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest
import torch

import csaligner.data
from csaligner.cli import main
from csaligner.data.features import PairedFeatures
from csaligner.train import embed, load_config, train
from csaligner.train.schedule import lr_at
from tests.train import helpers
from tests.train.helpers import fast_overrides


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_training_reduces_the_loss_and_writes_the_run_dir(tmp_path: Path, features: PairedFeatures) -> None:
    result = train(load_config(None, fast_overrides(tmp_path, "train.epochs=15")), features)
    assert result.finished and result.step == result.total_steps == 15 * (46 // 16)
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert {"infonce", "cs", "lr", "samples_per_s", "grad_norm"} <= set(result.metrics)
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "config.yaml",
        "metrics.csv",
        "checkpoints",
        "image_adapter.safetensors",
        "text_adapter.safetensors",
        "summary.json",
    } <= names
    rows = read_csv(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, result.step + 1))
    assert float(rows[-1]["loss"]) == pytest.approx(losses[-1], abs=1e-7)
    assert load_config(tmp_path / "config.yaml").train.epochs == 15  # the resolved config reloads
    # Its header's command must not point back at this folder: a fresh run refuses a folder holding a run.
    assert f"--train.out_dir={tmp_path}-2" in (tmp_path / "config.yaml").read_text().splitlines()[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == result.step and summary["metrics"]["loss"] == pytest.approx(losses[-1])
    assert summary["metrics"]["epoch"] == 15.0 and float(rows[0]["epoch"]) == round(1 / (46 // 16), 4)


def test_embed_applies_the_trained_adapters(tmp_path: Path, features: PairedFeatures) -> None:
    result = train(load_config(None, fast_overrides(tmp_path, "train.epochs=15")), features)
    image, text = embed(features, result.run_dir)
    assert image.shape == (48, 12) and text.shape == (features.num_texts, 12)
    assert torch.allclose(image.norm(dim=1), torch.ones(48), atol=1e-5)
    paired = features.text_to_image >= 0
    sim = text[paired] @ image.T  # (texts, images)
    recall1 = (sim.argmax(1) == features.text_to_image[paired]).float().mean()
    assert recall1 > 0.3  # chance is 1/48


def test_lr_schedule_warms_up_then_decays() -> None:
    cfg = load_config(None, ["train.lr=1.0", "train.warmup_steps=4", "train.steps=20"]).train
    lrs = [lr_at(s, 20, cfg) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:])) and lrs[-1] < 0.01


@pytest.mark.parametrize(
    "variant",
    [
        ["data.paired_fraction=0.5", "data.unpaired_batch_size=8"],
        ["data.captions_per_image=all", "data.captions_per_image_in_cs=all"],
        ["data.captions_per_image_in_cs=all"],
        ["loss.objective=infonce"],
        ["train.precision=bf16", "train.ema=0.9"],
    ],
    ids=["unpaired", "multi-positive", "extra-captions-in-cs", "infonce", "bf16-ema"],
)
def test_variants_train(tmp_path: Path, features: PairedFeatures, variant: list[str]) -> None:
    result = train(load_config(None, fast_overrides(tmp_path, "train.steps=12", *variant)), features)
    losses = [row["loss"] for row in result.history]
    assert result.finished and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_unpaired_pool_enters_only_the_cs_term(
    tmp_path: Path, features: PairedFeatures, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, object]] = []
    from csaligner.losses.objective import AlignmentLoss

    original = AlignmentLoss.forward

    def spy(self, image, text, text_to_image=None, unpaired_images=None, unpaired_texts=None, **kw):
        seen.append(
            {
                "image": image.shape[0],
                "text": text.shape[0],
                "un_img": None if unpaired_images is None else unpaired_images.shape[0],
                "un_txt": None if unpaired_texts is None else unpaired_texts.shape[0],
            }
        )
        return original(self, image, text, text_to_image, unpaired_images, unpaired_texts, **kw)

    monkeypatch.setattr(AlignmentLoss, "forward", spy)
    overrides = fast_overrides(tmp_path, "train.steps=1", "data.paired_fraction=0.5", "data.unpaired_batch_size=8")
    train(load_config(None, overrides), features)
    assert seen == [{"image": 16, "text": 16, "un_img": 8, "un_txt": 8}]
    seen.clear()
    pairs_only = [*overrides, "data.use_unpaired=false", "data.unpaired_batch_size=0"]  # no pools to size
    train(load_config(None, [*pairs_only, "train.out_dir=" + str(tmp_path / "b")]), features)
    assert seen == [{"image": 16, "text": 16, "un_img": None, "un_txt": None}]


@pytest.mark.parametrize(
    "variant", [["data.paired_fraction=0.5", "data.use_unpaired=false"], []], ids=["half-paired", "all-paired"]
)
def test_an_objective_without_a_divergence_gets_no_unpaired_pools(
    tmp_path: Path, features: PairedFeatures, monkeypatch: pytest.MonkeyPatch, variant: list[str]
) -> None:
    """infonce has no term for unpaired data (the loss refuses it), so the step neither maps nor passes any:
    not the unpaired half, and not the caption-less images and image-less texts (the default use_unpaired)."""
    from csaligner.losses.objective import AlignmentLoss

    seen: list[tuple[int, int, bool, bool]] = []
    original = AlignmentLoss.forward

    def spy(self, image, text, text_to_image=None, unpaired_images=None, unpaired_texts=None, **kw):  # type: ignore[no-untyped-def]
        seen.append((image.shape[0], text.shape[0], unpaired_images is None, unpaired_texts is None))
        return original(self, image, text, text_to_image, unpaired_images, unpaired_texts, **kw)

    monkeypatch.setattr(AlignmentLoss, "forward", spy)
    overrides = fast_overrides(tmp_path, "train.steps=1", "loss.objective=infonce", *variant)
    lines: list[str] = []
    result = train(load_config(None, overrides), features, report=lines.append)
    assert result.finished and seen == [(16, 16, True, True)]
    assert lines == [result.data]
    left_out = "left out: 25 images, 110 texts" if variant else "left out: 2 images, 4 texts"  # 2 + 4 caption-less
    assert f"{left_out} (loss.objective=infonce has no divergence term)" in result.data, result.data


def test_token_variant_adds_the_token_cs_term(tmp_path: Path, token_features: PairedFeatures) -> None:
    overrides = fast_overrides(
        tmp_path,
        "train.steps=8",
        "data.use_tokens=true",
        "loss.token_lam=0.1",
        "model.text={kind: prior, num_layers: 1, num_heads: 2, head_dim: 8}",
    )
    result = train(load_config(None, overrides), token_features)
    assert "token_cs" in result.metrics and result.metrics["token_cs"] >= 0
    _, text = embed(token_features, result.run_dir)  # the prior adapter sees the text tokens again
    assert text.shape == (token_features.num_texts, 12)


def test_tokens_requested_but_missing_is_explained(tmp_path: Path, features: PairedFeatures) -> None:
    prior = "model.text={kind: prior, num_layers: 1, num_heads: 2, head_dim: 8}"  # reads the text tokens
    with pytest.raises(ValueError, match=r"has no token features; re-encode it with `csalign encode --tokens"):
        train(load_config(None, fast_overrides(tmp_path, "train.steps=2", "data.use_tokens=true", prior)), features)


@pytest.mark.skipif(torch.cuda.is_available(), reason="trains on CUDA here")
def test_triton_loss_off_cuda_names_the_flags_before_anything_loads(tmp_path: Path) -> None:
    overrides = fast_overrides(tmp_path / "run", "train.steps=2", "loss.impl=triton", "data.image_cache=missing.pt")
    with pytest.raises(ValueError, match=r"loss\.impl=triton needs a CUDA device.*--loss\.impl=auto"):
        train(load_config(None, overrides))  # before the missing cache is looked for
    assert not (tmp_path / "run").exists()


def test_text_to_image_prior_maps_into_the_image_space(tmp_path: Path, features: PairedFeatures) -> None:
    overrides = fast_overrides(
        tmp_path,
        "train.steps=6",
        "model.image={kind: identity}",
        "model.text={kind: prior, num_layers: 1, num_heads: 2, head_dim: 8}",
        "model.out_dim=0",
    )
    result = train(load_config(None, overrides), features)
    image, text = embed(features, result.run_dir, normalize=False)
    assert torch.allclose(image, features.image)  # the image side is frozen as it is
    assert text.shape == (features.num_texts, 24)  # text adapter out_dim = image dim


def test_identity_side_with_a_different_dim_is_explained(tmp_path: Path, features: PairedFeatures) -> None:
    overrides = fast_overrides(tmp_path, "train.steps=2", "model.image={kind: identity}")  # out_dim 12 != 24
    with pytest.raises(ValueError, match=r"identity but its features have D=24.*set model\.out_dim=24"):
        train(load_config(None, overrides), features)


def test_cli_trains_from_caches(
    tmp_path: Path, features: PairedFeatures, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "txt").mkdir()
    calls = []

    def fake_load(image_cache: str, text_cache: str) -> PairedFeatures:
        calls.append((image_cache, text_cache))
        return helpers.synthetic_features()

    monkeypatch.setattr(csaligner.data, "load_paired_features", fake_load, raising=False)
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{image_cache: {tmp_path}/img, text_cache: {tmp_path}/txt}}\ntrain: {{steps: 4}}\n")
    argv = ["train", "--config", str(config)] + [f"--{o}" for o in fast_overrides(tmp_path / "run")]
    assert main(argv) == 0
    assert calls == [(f"{tmp_path}/img", f"{tmp_path}/txt")]
    out = capsys.readouterr().out
    assert "step 4/4" in out
    assert out.startswith("data: ") and " images paired with " in out  # the counts come first
    assert len(read_csv(tmp_path / "run" / "metrics.csv")) == 4
    assert main([*argv, "--train.resume=auto"]) == 0  # nothing left to run: said, not shown as a training run
    assert "had already reached step 4 of 4; no step to run" in capsys.readouterr().out
    assert main(["train", "--data.image_cache=/nonexistent", "--train.steps=1"]) == 1
    assert "feature cache '/nonexistent' does not exist" in capsys.readouterr().err


def test_tensorboard_scalars_are_written_when_available(tmp_path: Path, features: PairedFeatures) -> None:
    pytest.importorskip("tensorboard")
    train(load_config(None, fast_overrides(tmp_path, "train.steps=2", "train.tensorboard=true")), features)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_token_cs_without_image_tokens_is_explained(tmp_path: Path, token_features: PairedFeatures) -> None:
    token_features.image_tokens = None
    overrides = fast_overrides(tmp_path, "train.steps=2", "data.use_tokens=true", "loss.token_lam=0.1")
    with pytest.raises(ValueError, match="needs image token features"):
        train(load_config(None, overrides), token_features)


def test_token_images_limits_the_token_term_to_a_subset(
    tmp_path: Path, token_features: PairedFeatures, monkeypatch: pytest.MonkeyPatch
) -> None:
    from csaligner.losses.objective import AlignmentLoss

    seen: list[tuple[int, int]] = []
    original = AlignmentLoss.forward

    def spy(self, image, text, *args, **kw):  # type: ignore[no-untyped-def]
        seen.append((kw["image_tokens"].shape[0], kw["text_tokens"].shape[0]))
        return original(self, image, text, *args, **kw)

    monkeypatch.setattr(AlignmentLoss, "forward", spy)
    overrides = ["train.steps=1", "data.use_tokens=true", "loss.token_lam=0.1", "data.token_images=3"]
    result = train(load_config(None, fast_overrides(tmp_path, *overrides)), token_features)
    assert seen == [(3, 3)] and result.metrics["token_cs"] >= 0


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        (["train.batch_size=1"], r"train\.batch_size=1 gives InfoNCE one pair"),
        (["data.paired_fraction=0.01"], r"only 1 paired image \(data\.paired_fraction=0\.01\)"),
    ],
)
@pytest.mark.filterwarnings("ignore:train.batch_size=16 is more than")
def test_batches_of_one_pair_are_refused_where_infonce_trains(
    tmp_path: Path, features: PairedFeatures, overrides: list[str], why: str
) -> None:
    with pytest.raises(ValueError, match=why):
        train(load_config(None, fast_overrides(tmp_path / "a", "train.steps=2", *overrides)), features)
    l2 = ["loss.objective=l2_prior", "model.text={kind: linear}", "model.image={kind: identity}", "model.out_dim=0"]
    config = load_config(None, fast_overrides(tmp_path / "b", "train.steps=2", "train.batch_size=1", *l2))
    result = train(config, features)
    assert result.finished  # l2_prior has no InfoNCE term: one pair a step is a valid (if noisy) batch
