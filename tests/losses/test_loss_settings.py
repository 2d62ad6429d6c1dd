"""LossConfig refuses a setting its objective ignores (LossConfig(objective="infonce", lam=0.5) was plain InfoNCE)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

import csaligner.kernels
from csaligner import AlignmentLoss, LossConfig
from csaligner.losses.objective import LOSS_DEFAULTS, OBJECTIVES, SETTING_USERS, ignored_settings

# A valid value other than the default for every field only some objectives read.
OTHER_VALUE: dict[str, object] = {
    "lam": 0.5,
    "sigma": 0.5,
    "learn_sigma": True,
    "temperature": 0.2,
    "learn_temperature": True,
    "impl": "chunked",
}


def test_every_field_some_objectives_ignore_has_another_value_here() -> None:
    assert set(OTHER_VALUE) == set(SETTING_USERS)
    assert all(OTHER_VALUE[name] != LOSS_DEFAULTS[name] for name in OTHER_VALUE)


def _unchecked(objective: str, name: str | None = None) -> LossConfig:
    """The objective's default config with `name` set to its other value past validation."""
    config = copy.copy(LossConfig(objective=objective))  # type: ignore[arg-type]
    if name is not None:
        object.__setattr__(config, name, OTHER_VALUE[name])
    return config


def _what_it_does(config: LossConfig, monkeypatch: pytest.MonkeyPatch) -> tuple[list[float], list[str], bool]:
    """What a config changes in one loss call: the terms' values, the parameters given a gradient, and whether
    the fused InfoNCE + D_CS path (where impl applies) ran."""
    fused: list[str] = []
    real = csaligner.kernels.infonce_cs_terms

    def spy(*args: object, **kwargs: object) -> object:
        fused.append(str(kwargs.get("impl")))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(csaligner.kernels, "infonce_cs_terms", spy)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g, dtype=torch.float64)
    loss_fn = AlignmentLoss(config)
    out = loss_fn(x.requires_grad_(), y + 0.5)
    out["loss"].backward()
    moved = sorted(n for n, p in loss_fn.named_parameters() if p.grad is not None and bool(p.grad.abs() > 0))
    return [float(v.detach()) for v in out.values()], moved, bool(fused)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_the_fields_an_objective_refuses_are_exactly_those_it_ignores(
    objective: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A field an objective reads changes its terms, trains a parameter or picks its kernel path; a field it
    ignores changes none of these (so refusing it is right)."""
    values, moved, fused = _what_it_does(_unchecked(objective), monkeypatch)
    for name in SETTING_USERS:
        changed = _what_it_does(_unchecked(objective, name), monkeypatch)
        # impl: the same math by another path, so only the path tells
        reads = changed[2] if name == "impl" else changed[:2] != (values, moved)
        assert reads == (name not in ignored_settings({"objective": objective, name: OTHER_VALUE[name]})), name
    assert fused == (objective in ("cs_aligner", "infonce"))


CASES = [
    ("infonce", "lam", "no divergence term", "'cs_aligner', 'mmd' or 'kl'"),
    ("l2_prior", "lam", "no divergence term", "'cs_aligner', 'mmd' or 'kl'"),
    ("infonce", "sigma", "no kernel term", "'cs_aligner' or 'mmd', or turn on the token-level CS term"),
    ("kl", "sigma", "no kernel term", "'cs_aligner' or 'mmd', or turn on the token-level CS term"),
    ("l2_prior", "learn_sigma", "no kernel term", "'cs_aligner' or 'mmd'"),
    ("l2_prior", "temperature", "no InfoNCE term", "'cs_aligner', 'infonce', 'mmd' or 'kl'"),
    ("l2_prior", "learn_temperature", "no InfoNCE term", "'cs_aligner', 'infonce', 'mmd' or 'kl'"),
    ("mmd", "impl", "no fused InfoNCE + D_CS path", "'cs_aligner' or 'infonce'"),
    ("kl", "impl", "no fused InfoNCE + D_CS path", "'cs_aligner' or 'infonce'"),
]


@pytest.mark.parametrize(("objective", "name", "lacks", "users"), CASES)
def test_a_setting_the_objective_ignores_is_refused_naming_value_and_fix(
    objective: str, name: str, lacks: str, users: str
) -> None:
    value = OTHER_VALUE[name]
    with pytest.raises(ValueError) as err:
        LossConfig(objective=objective, **{name: value})  # type: ignore[arg-type]
    message = str(err.value)
    assert message.startswith(f"objective {objective!r} has {lacks}"), message
    assert f"so {name}={value!r} would be ignored; drop {name} (or set it back to its default" in message
    assert f"use objective {users}" in message


def test_the_infonce_message_names_lam_and_the_way_out() -> None:
    with pytest.raises(ValueError) as err:
        LossConfig(objective="infonce", lam=0.5)
    assert str(err.value) == (
        "objective 'infonce' has no divergence term, so lam=0.5 would be ignored; drop lam (or set it back to its "
        "default, 0.01) or use objective 'cs_aligner', 'mmd' or 'kl'"
    )


def test_every_ignored_setting_is_named_at_once() -> None:
    with pytest.raises(ValueError) as err:
        AlignmentLoss(objective="l2_prior", lam=0.5, temperature=0.2, impl="dense")  # type: ignore[arg-type]
    named = re.findall(r"so (\w+=\S+) would be ignored", str(err.value))
    assert named == ["lam=0.5", "temperature=0.2", "impl='dense'"]


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_defaults_are_not_settings(objective: str) -> None:
    """The defaults, given or not, build every objective: the dataclass cannot tell them apart."""
    assert LossConfig(objective=objective) == LossConfig(**{**LOSS_DEFAULTS, "objective": objective})  # type: ignore[arg-type]
    assert LossConfig(objective=objective, lam=0.01, sigma=1, temperature=0.07).sigma == 1  # type: ignore[arg-type]


@pytest.mark.parametrize("objective", ["infonce", "kl", "l2_prior"])
def test_sigma_is_read_by_the_token_level_term_of_every_objective(objective: str) -> None:
    config = LossConfig(objective=objective, sigma=0.5, learn_sigma=True, token_lam=0.1)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    xt, yt = torch.randn(3, 2, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    loss_fn = AlignmentLoss(config)
    loss_fn(x, y, image_tokens=xt, text_tokens=yt)["loss"].backward()
    assert loss_fn.log_sigma.grad is not None and float(loss_fn.log_sigma.grad.abs()) > 0


def test_the_settings_an_objective_reads_are_accepted() -> None:
    for objective in OBJECTIVES:
        for name, (users, _) in SETTING_USERS.items():
            if objective in users:
                value = OTHER_VALUE[name]
                assert getattr(LossConfig(objective=objective, **{name: value}), name) == value  # type: ignore[arg-type]


def test_a_config_file_setting_lam_for_infonce_is_refused(tmp_path: Path) -> None:
    from csaligner.train import load_config

    with pytest.raises(ValueError, match=r"objective 'infonce' has no divergence term, so lam=0\.5 would be ignored"):
        load_config(None, ["loss.objective=infonce", "loss.lam=0.5"])
    path = tmp_path / "c.yaml"
    path.write_text("loss: {objective: cs_aligner, lam: 0.1}\n")
    with pytest.raises(ValueError, match=r"lam=0\.1 would be ignored; drop lam \(or set it back to its default, 0\.01"):
        load_config(path, ["loss.objective=infonce"])
    assert load_config(path, ["loss.objective=infonce", "loss.lam=0.01"]).loss.objective == "infonce"  # the way out


def test_the_cli_refuses_lam_for_infonce(capsys: pytest.CaptureFixture[str]) -> None:
    from csaligner.cli import main

    assert main(["train", "--loss.objective=infonce", "--loss.lam=0.5", "--print-config"]) == 1
    err = capsys.readouterr().err
    assert "csalign train: error: loss: objective 'infonce' has no divergence term, so lam=0.5" in err
    assert main(["train", "--loss.objective=infonce", "--loss.temperature=0.1", "--print-config"]) == 0
