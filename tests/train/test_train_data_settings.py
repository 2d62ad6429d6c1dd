"""Data settings for unpaired data are refused under an objective without a divergence term (infonce, l2_prior),
which has no term to put them in, and data.unpaired_batch_size with data.use_unpaired=false, which leaves no pools
to draw from; stored configs that hold them load as the run that dropped them."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from csaligner.data.features import PairedFeatures
from csaligner.losses.objective import DIVERGENCE_TERMS, OBJECTIVES, LossConfig
from csaligner.train import DataConfig, RunConfig, load_config
from csaligner.train.batches import BatchSampler, split_features
from csaligner.train.checkpoint import config_changes
from csaligner.train.overrides import from_dict, to_dict
from csaligner.train.step import DeviceFeatures, model_inputs
from csaligner.train.stored_config import (
    RUN_CONFIG_HEADER,
    drop_ignored_settings,
    ignored_data_settings,
    ignored_unpaired_settings,
)

WITHOUT_DIVERGENCE = sorted(set(OBJECTIVES) - set(DIVERGENCE_TERMS))
UNPAIRED_SETTINGS = [
    {"paired_fraction": 0.5},  # use_unpaired stays at its default, true
    {"unpaired_batch_size": 1},
    {"captions_per_image_in_cs": "all"},
]


def _unchecked(objective: str, data: DataConfig) -> RunConfig:
    """A run config with `data` past RunConfig's checks: what a config refused now would have trained."""
    config = copy.copy(RunConfig(loss=LossConfig(objective=objective)))  # type: ignore[arg-type]
    object.__setattr__(config, "data", data)
    return config


def _step_inputs(features: PairedFeatures, config: RunConfig, steps: int = 3) -> list[dict[str, Any]]:
    """The feature rows the adapters map in the first steps: everything the data settings can change."""
    split = split_features(features, config.data, pools=config.loss.takes_unpaired)
    sampler = BatchSampler(split, config.data, batch_size=16, seed=0)
    feats = DeviceFeatures.from_features(features, torch.device("cpu"), use_tokens=False)
    return [model_inputs(feats, sampler.batch(step), config) for step in range(steps)]


def _same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    return all(
        x.keys() == y.keys()
        and all(
            (x[k] is None and y[k] is None) or (x[k] is not None and y[k] is not None and x[k].equal(y[k])) for k in x
        )
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("given", UNPAIRED_SETTINGS, ids=lambda g: next(iter(g)))
@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_refused_data_settings_are_exactly_those_the_objective_trains_without(
    features: PairedFeatures, objective: str, given: dict[str, Any]
) -> None:
    """A setting refused under an objective trains the same as the value it is dropped to; under an objective
    with a divergence the same setting changes what the adapters see (so refusing it there would be wrong)."""
    data = DataConfig(**given)
    ignored = ignored_data_settings(data.__dict__, objective)
    dropped = dataclasses.replace(data, **ignored_data_settings(data.__dict__, WITHOUT_DIVERGENCE[0]))
    assert dropped != data
    same = _same(
        _step_inputs(features, _unchecked(objective, data)), _step_inputs(features, _unchecked(objective, dropped))
    )
    if objective in DIVERGENCE_TERMS:
        assert ignored == {} and not same
    else:
        assert ignored and same
        with pytest.raises(ValueError, match=f"objective {objective!r} has no divergence term"):
            RunConfig(data=data, loss=LossConfig(objective=objective))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "data.paired_fraction=0.25",
            "data.paired_fraction=0.25 with data.use_unpaired=true would put the other images and their captions into "
            "unpaired pools, but objective '{o}' has no divergence term, the only term they enter, so they would be "
            "dropped; set data.use_unpaired=false to train on the pairs alone (what '{o}' does), or use objective "
            "'cs_aligner', 'mmd' or 'kl' to train on the pools too",
        ),
        (
            "data.unpaired_batch_size=256",
            "data.unpaired_batch_size=256 sizes a step's draw of unpaired data, but objective '{o}' has no divergence "
            "term, the only term they enter, so it would be ignored; drop it (or set it back to its default, 0) or use "
            "objective 'cs_aligner', 'mmd' or 'kl'",
        ),
        (
            "data.captions_per_image_in_cs=all",
            'data.captions_per_image_in_cs="all" with captions_per_image="one" puts each image\'s other captions into '
            "the divergence term alone, but objective '{o}' has no divergence term, the only term they enter, so they "
            'would be ignored; drop it (or set it back to its default, "one"), set data.captions_per_image="all" to '
            "train on every caption, or use objective 'cs_aligner', 'mmd' or 'kl'",
        ),
    ],
)
@pytest.mark.parametrize("objective", WITHOUT_DIVERGENCE)
def test_the_refusal_names_the_setting_its_value_the_objective_and_the_fix(
    objective: str, override: str, expected: str
) -> None:
    with pytest.raises(ValueError) as err:
        load_config(None, [f"loss.objective={objective}", override])
    assert str(err.value) == expected.format(o=objective)


def test_every_refused_data_setting_is_named_at_once() -> None:
    with pytest.raises(ValueError) as err:
        load_config(None, ["loss.objective=infonce", "data.paired_fraction=0.5", "data.unpaired_batch_size=8"])
    assert "data.paired_fraction=0.5 with data.use_unpaired=true" in str(err.value)
    assert "; data.unpaired_batch_size=8 sizes" in str(err.value)


@pytest.mark.parametrize("objective", WITHOUT_DIVERGENCE)
@pytest.mark.parametrize(
    "overrides",
    [
        [
            "data.paired_fraction=0.5",
            "data.use_unpaired=false",
        ],  # fewer pairs, the rest dropped: read by every objective
        ["data.captions_per_image=all", "data.captions_per_image_in_cs=all"],  # every caption a positive
        ["data.unpaired_batch_size=0", "data.captions_per_image_in_cs=one", "data.use_unpaired=true"],  # the defaults
    ],
)
def test_what_an_objective_without_a_divergence_reads_is_accepted(objective: str, overrides: list[str]) -> None:
    config = load_config(None, [f"loss.objective={objective}", *overrides])
    assert config.loss.objective == objective


def test_fewer_pairs_without_the_pools_is_read_by_infonce(features: PairedFeatures) -> None:
    half = _step_inputs(
        features, load_config(None, ["loss.objective=infonce", "data.paired_fraction=0.5", "data.use_unpaired=false"])
    )
    assert not _same(half, _step_inputs(features, load_config(None, ["loss.objective=infonce"])))


def test_a_stored_config_with_refused_data_settings_loads_as_the_run_that_dropped_them() -> None:
    """Earlier versions accepted infonce with unpaired settings and dropped the pools; their stored config loads
    now as the same run, which a resume or the demo compares against."""
    stored = to_dict(load_config(None, ["loss.objective=infonce"]))
    stored["data"].update(paired_fraction=0.5, use_unpaired=True, unpaired_batch_size=8, captions_per_image_in_cs="all")
    with pytest.raises(ValueError, match="has no divergence term"):
        from_dict(RunConfig, stored)
    loaded = from_dict(RunConfig, drop_ignored_settings(stored))
    assert loaded.data == DataConfig(paired_fraction=0.5, use_unpaired=False)
    cs = {**stored, "loss": {**stored["loss"], "objective": "cs_aligner"}}
    assert drop_ignored_settings(cs) == cs  # the same values under cs_aligner are read, and kept


# ---------------------------------------------------------------- unpaired_batch_size with use_unpaired=false

POOLS_OFF = (
    "data.unpaired_batch_size=256 sizes a step's draw of unpaired data, but data.use_unpaired=false drops the unpaired "
    "pools, so it would be ignored; drop it (or set it back to its default, 0), or set data.use_unpaired=true to train "
    "on the pools"
)


@pytest.mark.parametrize("use_unpaired", [False, True])
@pytest.mark.parametrize("objective", sorted(DIVERGENCE_TERMS))
def test_unpaired_batch_size_is_refused_exactly_where_there_are_no_pools_to_draw_from(
    features: PairedFeatures, objective: str, use_unpaired: bool
) -> None:
    """With use_unpaired=false an unpaired_batch_size trains as its default (refused); with the pools on it
    changes what the adapters see (accepted)."""
    data = DataConfig(paired_fraction=0.5, use_unpaired=use_unpaired, unpaired_batch_size=1)
    default = dataclasses.replace(data, unpaired_batch_size=0)
    same = _same(
        _step_inputs(features, _unchecked(objective, data)), _step_inputs(features, _unchecked(objective, default))
    )
    assert same is not use_unpaired
    assert ignored_unpaired_settings(data.__dict__) == ({} if use_unpaired else {"unpaired_batch_size": 0})
    if use_unpaired:
        assert RunConfig(data=data, loss=LossConfig(objective=objective)).data == data  # type: ignore[arg-type]
    else:
        with pytest.raises(ValueError, match=r"data\.use_unpaired=false drops the unpaired pools"):
            RunConfig(data=data, loss=LossConfig(objective=objective))  # type: ignore[arg-type]


def test_the_pools_off_refusal_names_the_value_and_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError) as err:
        load_config(None, ["data.use_unpaired=false", "data.unpaired_batch_size=256"])
    assert str(err.value) == POOLS_OFF
    from csaligner.cli import main

    assert main(["train", "--data.use_unpaired=false", "--data.unpaired_batch_size=256", "--print-config"]) == 1
    assert capsys.readouterr().err == f"csalign train: error: {POOLS_OFF}\n"


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.use_unpaired=false", "data.unpaired_batch_size=0"],  # the default, given
        ["data.use_unpaired=false", "data.paired_fraction=0.5"],
        ["data.unpaired_batch_size=8"],  # use_unpaired=true with every image paired: caption-less images form pools
        ["data.use_unpaired=true", "data.paired_fraction=0.5", "data.unpaired_batch_size=8"],
    ],
)
def test_unpaired_batch_size_is_accepted_where_pools_can_be_drawn_from(overrides: list[str]) -> None:
    config = load_config(None, overrides)
    assert drop_ignored_settings(to_dict(config)) == to_dict(config)  # nothing to drop


def test_under_infonce_the_objective_is_the_one_reason_given() -> None:
    with pytest.raises(ValueError) as err:
        load_config(None, ["loss.objective=infonce", "data.use_unpaired=false", "data.unpaired_batch_size=8"])
    assert str(err.value).count("data.unpaired_batch_size=8") == 1
    assert "objective 'infonce' has no divergence term" in str(err.value)
    # the fix it names is whole: a divergence alone would meet the pools-off refusal next
    assert str(err.value).endswith(
        "or use objective 'cs_aligner', 'mmd' or 'kl' with data.use_unpaired=true (false drops the pools it draws from)"
    )
    load_config(None, ["loss.objective=cs_aligner", "data.use_unpaired=true", "data.unpaired_batch_size=8"])


def test_a_stored_config_with_unpaired_batch_size_and_no_pools_loads_as_the_run_that_ignored_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Earlier versions accepted unpaired_batch_size beside use_unpaired=false and drew nothing with it: a resume
    compares the stored config without it (showing why), and a run's config.yaml loads with a note."""
    run = load_config(None, ["data.use_unpaired=false", "data.paired_fraction=0.5"])
    stored = to_dict(run)
    stored["data"]["unpaired_batch_size"] = 64
    with pytest.raises(ValueError, match=r"data\.unpaired_batch_size=64 .*data\.use_unpaired=false drops"):
        from_dict(RunConfig, stored)
    assert from_dict(RunConfig, drop_ignored_settings(stored)) == run
    pools_on = {**stored, "data": {**stored["data"], "use_unpaired": True}}
    assert drop_ignored_settings(pools_on) == pools_on  # with the pools the size is read, and kept
    new = to_dict(load_config(None, ["data.paired_fraction=0.5", "data.unpaired_batch_size=64"]))
    assert config_changes(drop_ignored_settings(stored), new, frozenset(), as_stored=stored) == [
        "data.unpaired_batch_size: 64 (stored, but data.use_unpaired=false left no unpaired pools for it to draw "
        "from: dropped to 0) -> 64",
        "data.use_unpaired: False -> True",
    ]
    config_yaml = tmp_path / "config.yaml"
    config_yaml.write_text(f"{RUN_CONFIG_HEADER}\n{yaml.safe_dump(stored, sort_keys=False)}")
    notes: list[str] = []
    assert load_config(config_yaml, report=notes.append) == run
    assert len(notes) == 1 and "it loads as the run trained: data.unpaired_batch_size=0 (stored: 64)." in notes[0]
    preset = tmp_path / "preset.yaml"  # not a run's record: refused, as a preset the user wrote
    preset.write_text(yaml.safe_dump(stored, sort_keys=False))
    with pytest.raises(ValueError, match=r"data\.use_unpaired=false drops the unpaired pools"):
        load_config(preset)
