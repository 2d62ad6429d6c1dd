"""Token data settings are refused where nothing reads them (loss.token_lam=0 and, for use_tokens, a text adapter
that ignores tokens); stored configs that hold them load as the run that ignored them."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from csaligner.adapters import ADAPTERS, reads_text_tokens
from csaligner.data.features import PairedFeatures
from csaligner.train import DataConfig, RunConfig, load_config, train
from csaligner.train.checkpoint import config_changes
from csaligner.train.overrides import from_dict, to_dict
from csaligner.train.stored_config import drop_ignored_settings, ignored_token_settings
from tests.train.helpers import fast_overrides

PRIOR = "model.text={kind: prior, num_layers: 1, num_heads: 2, head_dim: 8}"


def _losses(tmp_path: Path, features: PairedFeatures, overrides: list[str], data: dict[str, Any]) -> list[float]:
    """The loss of each of 3 steps under `overrides` with `data` set past RunConfig's checks (what a config
    refused now would have trained)."""
    config = copy.copy(load_config(None, fast_overrides(tmp_path, "train.steps=3", *overrides)))
    object.__setattr__(config, "data", DataConfig(**{**config.data.__dict__, **data}))
    return [row["loss"] for row in train(config, features).history]


@pytest.mark.parametrize(
    ("overrides", "given", "refused"),
    [
        ([], {"token_images": 3}, True),  # no token term: nothing picks token images
        (["data.use_tokens=true", PRIOR], {"token_images": 3}, True),  # text tokens read, the token term off
        ([], {"use_tokens": True}, True),  # mlp text adapter, no token term: the tokens reach nothing
        (["model.text={kind: linear}"], {"use_tokens": True}, True),
        ([PRIOR], {"use_tokens": True}, False),  # the prior attends to the text tokens
        (["data.use_tokens=true", "loss.token_lam=0.1"], {"token_images": 3}, False),  # a subset for the term
    ],
    ids=["token_images", "token_images-prior", "use_tokens-mlp", "use_tokens-linear", "prior", "token_term"],
)
def test_refused_token_settings_are_exactly_those_that_train_as_their_default(
    tmp_path: Path, token_features: PairedFeatures, overrides: list[str], given: dict[str, Any], refused: bool
) -> None:
    """A refused setting trains step for step as the value it is dropped to; an accepted one changes the run."""
    base = load_config(None, fast_overrides(tmp_path, *overrides))
    dropped = ignored_token_settings({**base.data.__dict__, **given}, base.loss.token_lam, base.model.text["kind"])
    default = {name: DataConfig().__dict__[name] for name in given}
    same = _losses(tmp_path / "a", token_features, overrides, given) == _losses(
        tmp_path / "b", token_features, overrides, default
    )
    assert same is refused
    assert dropped == (default if refused else {})
    key, value = next(iter(given.items()))
    flag = f"data.{key}={str(value).lower()}"
    if refused:
        with pytest.raises(ValueError, match=rf"data\.{key}=.*turns off the token-level CS term"):
            load_config(None, fast_overrides(tmp_path, *overrides, flag))
    else:
        assert getattr(load_config(None, fast_overrides(tmp_path, *overrides, flag)).data, key) == value


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["data.token_images=64"],
            "data.token_images=64 picks the images of the token-level CS term, but loss.token_lam=0.0 turns off the "
            "token-level CS term, so it would be ignored; drop it (or set it back to its default, 0), or train the "
            "term with loss.token_lam > 0 and data.use_tokens=true",
        ),
        (
            ["data.use_tokens=true", "model.text={kind: linear}"],
            "data.use_tokens=true loads token features for the token-level CS term and for a text adapter that reads "
            "them, but loss.token_lam=0.0 turns off the token-level CS term and model.text.kind='linear' ignores text "
            "tokens, so they would be ignored; set data.use_tokens=false, train the term with loss.token_lam > 0, or "
            "give the text side a kind that reads tokens ('prior')",
        ),
    ],
)
def test_the_refusal_names_the_setting_its_value_and_the_fix(overrides: list[str], expected: str) -> None:
    with pytest.raises(ValueError) as err:
        load_config(None, overrides)
    assert str(err.value) == expected


def test_every_refused_data_setting_is_named_at_once() -> None:
    overrides = ["loss.objective=infonce", "data.unpaired_batch_size=8", "data.use_tokens=true", "data.token_images=4"]
    with pytest.raises(ValueError) as err:
        load_config(None, overrides)
    parts = str(err.value).split("; data.")
    assert [p.split("=")[0] for p in parts] == ["data.unpaired_batch_size", "use_tokens", "token_images"]


def test_only_the_prior_reads_text_tokens() -> None:
    assert [kind for kind in sorted(ADAPTERS) if reads_text_tokens(ADAPTERS[kind])] == ["prior"]


def test_a_stored_config_with_token_settings_nothing_read_loads_as_the_run_that_ignored_them() -> None:
    stored = to_dict(load_config(None, []))
    stored["data"].update(use_tokens=True, token_images=64)
    with pytest.raises(ValueError, match="turns off the token-level CS term"):
        from_dict(RunConfig, stored)
    assert from_dict(RunConfig, drop_ignored_settings(stored)).data == DataConfig()
    read = {**stored, "loss": {**stored["loss"], "token_lam": 0.1}}
    assert drop_ignored_settings(read) == read  # with the token term both are read, and kept
    prior = {**stored, "model": {**stored["model"], "text": {"kind": "prior"}}}
    assert drop_ignored_settings(prior)["data"] == {**stored["data"], "token_images": 0}  # use_tokens feeds the prior
    bare = {"data": {"use_tokens": True}}  # no model section: the default mlp text adapter, which ignores tokens
    assert drop_ignored_settings(bare) == {"data": {"use_tokens": False}}
    unknown = {"data": {"use_tokens": True}, "model": {"text": {"kind": "unregistered"}}}
    assert drop_ignored_settings(unknown) == unknown  # left for the config to refuse the kind


def test_resume_of_a_run_stored_with_token_settings_nothing_read(
    tmp_path: Path, token_features: PairedFeatures
) -> None:
    """Earlier versions accepted use_tokens and token_images beside an mlp text adapter without the token term,
    and stored them; the config that says what the run did resumes it, and a diff shows the stored values."""
    cfg = fast_overrides(tmp_path, "train.steps=6", "train.checkpoint_every=3")
    checkpoint = train(load_config(None, cfg), token_features, until_step=3).checkpoint
    assert checkpoint is not None
    state_file = Path(checkpoint) / "state.json"
    state = json.loads(state_file.read_text())
    state["config"]["data"].update(use_tokens=True, token_images=5)
    state_file.write_text(json.dumps(state))
    stored = state["config"]
    new = to_dict(load_config(None, [*cfg, "data.use_tokens=true", "data.token_images=5", "loss.token_lam=0.1"]))
    assert config_changes(drop_ignored_settings(stored), new, frozenset(), as_stored=stored) == [
        "data.token_images: 5 (stored, but loss.token_lam=0.0 turns off the token-level CS term, the only one that "
        "reads it: dropped to 0) -> 5",
        "data.use_tokens: True (stored, but neither the token-level CS term (loss.token_lam=0.0: off) nor text kind "
        "'mlp' reads tokens: dropped to False) -> True",
        "loss.token_lam: 0.0 -> 0.1",
    ]
    result = train(load_config(None, [*cfg, "train.resume=auto"]), token_features)
    assert result.finished and result.step == 6
