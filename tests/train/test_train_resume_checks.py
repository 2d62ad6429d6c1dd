"""Resume checks the checkpoint against the run: a changed config or a damaged file is an error for people."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from csaligner.data.features import PairedFeatures
from csaligner.train import load_checkpoint, load_config, train
from tests.train.helpers import fast_overrides, synthetic_features

BASE = ["train.steps=6", "train.checkpoint_every=3"]


@pytest.fixture
def stopped(tmp_path: Path, features: PairedFeatures) -> Path:
    """A run stopped at step 3 with a checkpoint there; returns its step-3 checkpoint directory."""
    result = train(load_config(None, fast_overrides(tmp_path, *BASE)), features, until_step=3)
    assert result.checkpoint is not None
    return Path(result.checkpoint)


def _resume(tmp_path: Path, features: PairedFeatures, *changes: str) -> object:
    return train(load_config(None, fast_overrides(tmp_path, *BASE, "train.resume=auto", *changes)), features)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("model.out_dim=8", "model.out_dim: 12 -> 8"),
        ("model.text={kind: linear}", "model.text.kind: 'mlp' -> 'linear'"),
        ("model.image.mlp_ratio=2", "model.image.mlp_ratio: (unset) -> 2"),  # a setting its kind uses
        ("train.batch_size=8", "train.batch_size: 16 -> 8"),
        ("train.steps=8", "train.steps: 6 -> 8"),
        ("train.seed=1", "train.seed: 0 -> 1"),
        ("loss.lam=0.5", "loss.lam: 0.01 -> 0.5"),
        ("data.paired_fraction=0.5", "data.paired_fraction: 1.0 -> 0.5"),
    ],
)
def test_resume_with_a_changed_config_names_the_fields(
    tmp_path: Path, features: PairedFeatures, stopped: Path, change: str, expected: str
) -> None:
    with pytest.raises(ValueError, match=r"different config") as err:
        _resume(tmp_path, features, change)
    message = str(err.value)
    assert expected in message and str(stopped) in message
    assert "train.resume:" not in message  # resume itself is expected to differ from the stored run
    fix = 'Resume with the checkpoint\'s values (its state.json stores them under "config")'
    command = f", e.g. `csalign train --config {tmp_path / 'config.yaml'} --train.resume=auto`"
    # no stored value refused now: nothing to add but the command that resumes (a resume without --config is
    # the usual way to get here)
    assert message.endswith(f"{fix}{command}; or start a new run in another train.out_dir")


def _stored_with(checkpoint: str | None, section: str, values: dict[str, object]) -> None:
    """Write values into a section of a checkpoint's stored config ("loss", or "model.text"), as an earlier
    version stored them; a dict value updates the mapping it names."""
    assert checkpoint is not None
    state_file = Path(checkpoint) / "state.json"
    state = json.loads(state_file.read_text())
    target = state["config"]
    for part in section.split("."):
        target = target[part]
    for key, value in values.items():
        if isinstance(value, dict):
            target[key].update(value)
        else:
            target[key] = value
    state_file.write_text(json.dumps(state))


def test_resume_of_a_run_stored_with_a_setting_its_kind_ignores(tmp_path: Path, features: PairedFeatures) -> None:
    # Earlier versions accepted model.text.mlp_ratio for a linear adapter, ignored it and stored it in the
    # checkpoint. It is refused at load now; without it the resume continues the very same model.
    cfg = fast_overrides(tmp_path, *BASE, "model.text={kind: linear}")
    _stored_with(train(load_config(None, cfg), features, until_step=3).checkpoint, "model.text", {"mlp_ratio": 8})
    result = train(load_config(None, [*cfg, "train.resume=auto"]), features)
    assert result.finished and result.step == 6
    assert load_config(tmp_path / "config.yaml").model.text == {"kind": "linear"}  # the run's config reloads


def test_resume_of_a_run_stored_with_an_mlp_bias_its_widths_ignore(tmp_path: Path, features: PairedFeatures) -> None:
    # Earlier versions took model.text.bias=false for an mlp whose widths are equal (16 -> 16) and built it
    # without a bias, as with bias=true. It is refused now; the resume without it continues the same model.
    cfg = fast_overrides(tmp_path, *BASE, "model.out_dim=16")
    _stored_with(train(load_config(None, cfg), features, until_step=3).checkpoint, "model.text", {"bias": False})
    result = train(load_config(None, [*cfg, "train.resume=auto"]), features)
    assert result.finished and result.step == 6


def test_resume_of_a_run_stored_with_a_loss_value_its_objective_ignores(
    tmp_path: Path, features: PairedFeatures
) -> None:
    # Earlier versions accepted loss.lam (and sigma) for infonce, ignored them and stored them in the checkpoint.
    # They are refused at load now; without them the resume continues the very same training.
    cfg = fast_overrides(tmp_path, *BASE, "loss.objective=infonce")
    _stored_with(train(load_config(None, cfg), features, until_step=3).checkpoint, "loss", {"lam": 0.5, "sigma": 0.3})
    with pytest.raises(ValueError, match=r"objective 'infonce' has no divergence term, so lam=0\.5 would be ignored"):
        load_config(None, [*cfg, "loss.lam=0.5"])
    result = train(load_config(None, [*cfg, "train.resume=auto"]), features)
    assert result.finished and result.step == 6
    assert load_config(tmp_path / "config.yaml").loss.lam == 0.01  # the run's config reloads


def test_resume_of_a_run_stored_with_unpaired_data_settings_its_objective_ignores(
    tmp_path: Path, features: PairedFeatures
) -> None:
    # Earlier versions accepted unpaired pools for infonce, dropped them and stored the settings in the
    # checkpoint. They are refused at load now; the config that says what the run did resumes it.
    cfg = fast_overrides(tmp_path, *BASE, "loss.objective=infonce", "data.paired_fraction=0.5")
    pairs_only = [*cfg, "data.use_unpaired=false"]
    checkpoint = train(load_config(None, pairs_only), features, until_step=3).checkpoint
    _stored_with(
        checkpoint, "data", {"use_unpaired": True, "unpaired_batch_size": 8, "captions_per_image_in_cs": "all"}
    )
    with pytest.raises(ValueError, match=r"data\.use_unpaired=false to train on the pairs alone"):
        load_config(None, cfg)
    result = train(load_config(None, [*pairs_only, "train.resume=auto"]), features)
    assert result.finished and result.step == 6
    assert load_config(tmp_path / "config.yaml").data.use_unpaired is False  # the run's config reloads


def test_resume_of_a_run_stored_with_an_unpaired_batch_size_and_no_pools(
    tmp_path: Path, features: PairedFeatures
) -> None:
    # Earlier versions accepted unpaired_batch_size beside use_unpaired=false, drew nothing with it and stored it
    # in the checkpoint. It is refused at load now; the config that says what the run did resumes it.
    pairs_only = fast_overrides(tmp_path, *BASE, "data.paired_fraction=0.5", "data.use_unpaired=false")
    checkpoint = train(load_config(None, pairs_only), features, until_step=3).checkpoint
    _stored_with(checkpoint, "data", {"unpaired_batch_size": 8})
    with pytest.raises(ValueError, match=r"data\.unpaired_batch_size=8 .*data\.use_unpaired=false drops"):
        load_config(None, [*pairs_only, "data.unpaired_batch_size=8"])
    result = train(load_config(None, [*pairs_only, "train.resume=auto"]), features)
    assert result.finished and result.step == 6


def test_resume_still_compares_the_loss_values_the_objective_reads(tmp_path: Path, features: PairedFeatures) -> None:
    cfg = fast_overrides(tmp_path, *BASE, "loss.objective=infonce")
    _stored_with(
        train(load_config(None, cfg), features, until_step=3).checkpoint, "loss", {"lam": 0.5, "temperature": 0.2}
    )
    with pytest.raises(ValueError, match=r"different config: loss\.temperature: 0\.2 -> 0\.07") as err:
        train(load_config(None, [*cfg, "train.resume=auto"]), features)
    assert "loss.lam:" not in str(err.value)  # not compared; named only as what to give instead of the stored 0.5
    assert "give what the run trained with: loss.lam=0.01 (stored: 0.5); or start" in str(err.value)


@pytest.mark.parametrize(
    ("run", "stored", "resume", "expected", "instead"),
    [
        (
            ["loss.objective=infonce"],
            {"loss": {"lam": 0.5}},
            ["loss.objective=cs_aligner", "loss.lam=0.5"],
            "loss.lam: 0.5 (stored, but objective 'infonce' ignored it: dropped to 0.01) -> 0.5",
            "loss.lam=0.01 (stored: 0.5)",
        ),
        (
            ["model.text={kind: linear}"],
            {"model": {"text": {"mlp_ratio": 2}}},
            ["model.text={kind: mlp, mlp_ratio: 2}"],
            "model.text.mlp_ratio: 2 (stored, but kind 'linear' ignored it: dropped) -> 2",
            "model.text.mlp_ratio left out (stored: 2)",
        ),
        (
            ["loss.objective=infonce", "data.paired_fraction=0.5", "data.use_unpaired=false"],
            {"data": {"use_unpaired": True}},
            ["loss.objective=cs_aligner", "data.paired_fraction=0.5"],
            "data.use_unpaired: True (stored, but objective 'infonce' ignored it: dropped to False) -> True",
            "data.use_unpaired=false (stored: True)",
        ),
    ],
    ids=["loss", "adapter", "data"],
)
def test_a_changed_setting_that_was_dropped_as_ignored_shows_what_was_stored(
    tmp_path: Path,
    features: PairedFeatures,
    run: list[str],
    stored: dict[str, dict[str, object]],
    resume: list[str],
    expected: str,
    instead: str,
) -> None:
    """The stored value was dropped (to its default) as one its objective or kind ignored; a resume that sets it
    under another objective or kind must show the value the checkpoint holds, not the default it became, and
    must not send the user back to that value (refused now) but to the one the run trained with, which resumes."""
    checkpoint = train(load_config(None, fast_overrides(tmp_path, *BASE, *run)), features, until_step=3).checkpoint
    for section, values in stored.items():
        _stored_with(checkpoint, section, values)
    with pytest.raises(ValueError, match="different config") as err:
        train(load_config(None, fast_overrides(tmp_path, *BASE, *resume, "train.resume=auto")), features)
    assert expected in str(err.value), str(err.value)
    fix = 'Resume with the checkpoint\'s values (its state.json stores them under "config"), except the stored '
    assert f"{fix}values refused now, for which give what the run trained with: {instead}; or start" in str(err.value)
    result = train(load_config(None, fast_overrides(tmp_path, *BASE, *run, "train.resume=auto")), features)
    assert result.finished and result.step == 6  # the checkpoint's values with `instead` for the refused one


def test_resume_of_a_run_stored_with_a_learned_setting_its_objective_ignored_says_why(
    tmp_path: Path, features: PairedFeatures
) -> None:
    """learn_sigma for infonce added a parameter (that never moved) to the checkpoint: dropping the flag
    cannot make the checkpoint fit, and "does not fit this run's model" would not say why."""
    cfg = fast_overrides(tmp_path, *BASE, "loss.objective=infonce")
    _stored_with(train(load_config(None, cfg), features, until_step=3).checkpoint, "loss", {"learn_sigma": True})
    with pytest.raises(ValueError) as err:
        train(load_config(None, [*cfg, "train.resume=auto"]), features)
    message = str(err.value)
    assert "trained with loss.learn_sigma=true, which objective 'infonce' ignores" in message
    assert "Start a new run in another train.out_dir" in message


def test_resume_may_change_bookkeeping_fields(tmp_path: Path, features: PairedFeatures, stopped: Path) -> None:
    changes = ["train.log_every=2", "train.checkpoint_every=2", "train.keep_checkpoints=3", "train.device=cpu"]
    result = _resume(tmp_path, features, *changes, "train.progress=true", "loss.impl=chunked")
    assert result.finished and result.step == 6  # type: ignore[attr-defined]


def test_resume_on_other_data_of_the_same_config_is_refused(tmp_path: Path, features: PairedFeatures) -> None:
    cfg = fast_overrides(tmp_path, "train.epochs=3", "train.checkpoint_every=3")  # 46 paired // 16 = 2 steps/epoch
    train(load_config(None, cfg), features, until_step=3)
    smaller = synthetic_features(n_images=32)  # same dims, 30 paired images: 1 step per epoch, another schedule
    with pytest.raises(ValueError, match=r"planned 6 steps.*this run plans 3"):
        train(load_config(None, [*cfg, "train.resume=auto"]), smaller)


def test_checkpoint_from_another_model_is_explained(tmp_path: Path, features: PairedFeatures, stopped: Path) -> None:
    state = json.loads((stopped / "state.json").read_text())
    del state["config"]  # no stored config to compare: the weights' shapes are the last line of defence
    (stopped / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"does not fit this run's model"):
        _resume(tmp_path, features, "model.out_dim=8")


def test_truncated_weights_are_explained(tmp_path: Path, features: PairedFeatures, stopped: Path) -> None:
    weights = stopped / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model\.safetensors.*damaged.*train\.resume="):
        load_checkpoint(stopped)
    with pytest.raises(ValueError, match=str(weights)):
        _resume(tmp_path, features)


@pytest.mark.parametrize("content", ['{"format": 1, "step": 3', "[1, 2]", '{"format": 1}'])
def test_corrupt_state_json_is_explained(tmp_path: Path, features: PairedFeatures, stopped: Path, content: str) -> None:
    (stopped / "state.json").write_text(content)
    with pytest.raises(ValueError, match=r"state\.json.*damaged") as err:
        _resume(tmp_path, features)
    assert str(stopped) in str(err.value)


def test_resume_on_other_data_with_the_same_step_count_is_refused(tmp_path: Path) -> None:
    cfg = fast_overrides(tmp_path, "train.steps=4", "train.checkpoint_every=2")
    first = synthetic_features()
    first.meta.update(source="flickr8k:dev", manifest="a" * 64)
    train(load_config(None, cfg), first, until_step=2)
    other = synthetic_features(seed=1)  # same shapes and steps: only the recorded manifest tells them apart
    other.meta.update(source="flickr8k:train", manifest="b" * 64)
    with pytest.raises(ValueError, match=r"other data \('flickr8k:dev'.*\('flickr8k:train'"):
        train(load_config(None, [*cfg, "train.resume=auto"]), other)
    same = synthetic_features()
    same.meta.update(source="flickr8k:dev", manifest="a" * 64)  # the same data from a moved cache resumes
    assert train(load_config(None, [*cfg, "train.resume=auto"]), same).finished


def test_a_resume_path_that_is_no_checkpoint_says_what_it_is(
    stopped: Path, tmp_path: Path, features: PairedFeatures
) -> None:
    """ "yes is not a complete checkpoint: missing [...]" named the files, not the mistake."""
    other = tmp_path / "other"

    def resume(value: str) -> object:
        return train(load_config(None, fast_overrides(other, *BASE, f"train.resume={value}")), features)

    with pytest.raises(
        FileNotFoundError, match=r"train.resume='yes': no such checkpoint folder; pass train.resume=auto"
    ):
        resume("yes")
    with pytest.raises(FileNotFoundError) as err:
        resume(str(tmp_path))  # the run folder, not one of its checkpoints
    assert str(err.value) == (
        f"train.resume={str(tmp_path)!r} is a run folder, not a checkpoint; pass its latest checkpoint, "
        f"train.resume={stopped}, or train.resume=auto with train.out_dir={tmp_path}"
    )
    assert resume(str(stopped)).step == 6  # the checkpoint itself resumes


def test_the_resume_command_named_for_a_changed_config_resumes(
    tmp_path: Path, features: PairedFeatures, stopped: Path
) -> None:
    """The error named the diffs but not the fix a user who forgot --config needs: the run's own config.yaml."""
    with pytest.raises(ValueError, match=r"e\.g\. `csalign train --config (\S+) --train\.resume=auto`") as err:
        _resume(tmp_path, features, "train.seed=1")
    stored = str(err.value).split("--config ")[1].split(" ")[0]
    assert stored == str(tmp_path / "config.yaml")
    assert train(load_config(stored, ["train.resume=auto"]), features).step == 6
    other = tmp_path / "elsewhere"  # another folder's checkpoint: its config.yaml is not this out_dir's to name
    with pytest.raises(ValueError, match="different config") as err:
        train(load_config(None, fast_overrides(other, *BASE, f"train.resume={stopped}", "train.seed=1")), features)
    assert "e.g. `csalign train" not in str(err.value)
