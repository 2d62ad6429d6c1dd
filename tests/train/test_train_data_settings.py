"""Data settings for unpaired data are refused under an objective without a divergence term (infonce, l2_prior),
which has no term to put them in; stored configs that hold them load as the run that dropped them."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch

from csaligner.data.features import PairedFeatures
from csaligner.losses.objective import DIVERGENCE_TERMS, OBJECTIVES, LossConfig
from csaligner.train import DataConfig, RunConfig, load_config
from csaligner.train.batches import BatchSampler, split_features
from csaligner.train.overrides import from_dict, to_dict
from csaligner.train.step import DeviceFeatures, model_inputs
from csaligner.train.stored_config import drop_ignored_settings, ignored_data_settings

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
