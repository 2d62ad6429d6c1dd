"""`model.image` / `model.text` overrides: tune the default adapter, reject unknown adapter keys early."""

from __future__ import annotations

from pathlib import Path

import pytest

from csaligner.cli import main
from csaligner.train import load_config


def test_a_nested_flag_tunes_the_default_adapter() -> None:
    cfg = load_config(None, ["model.image.mlp_ratio=8", "model.text.mlp_alpha=0.5"])
    assert cfg.model.image == {"kind": "mlp", "mlp_ratio": 8}
    assert cfg.model.text == {"kind": "mlp", "mlp_alpha": 0.5}


def test_a_yaml_section_without_kind_keeps_the_default_kind(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  image: {mlp_ratio: 2}\n")
    assert load_config(path).model.image == {"kind": "mlp", "mlp_ratio": 2}


def test_a_given_kind_replaces_the_default() -> None:
    assert load_config(None, ["model.image={kind: linear}"]).model.image == {"kind": "linear"}


def test_unknown_adapter_keys_are_rejected_when_the_config_loads() -> None:
    with pytest.raises(ValueError, match=r"unknown key model\.image\.foo; adapter keys: .*mlp_ratio"):
        load_config(None, ["model.image={kind: mlp, foo: 1}"])


def test_every_preset_still_loads() -> None:
    presets = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))
    assert presets
    for path in presets:
        load_config(path)


# ---------------------------------------------------------------- settings the kind does not use


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.text.kind=linear", "model.text.mlp_ratio=8"],  # the audit's command line
            "model.text.mlp_ratio=8 (used by kind 'mlp') does not apply to kind='linear', which takes only bias",
        ),
        (
            ["model.text.kind=linear", "model.text.mlp_ratio=4"],  # given, though equal to the default
            "model.text.mlp_ratio=4 (used by kind 'mlp') does not apply to kind='linear'",
        ),
        (
            ["model.image={kind: identity, bias: false}", "model.text={kind: prior}"],
            "model.image.bias=False (used by kinds 'linear', 'mlp') does not apply to kind='identity', which takes no",
        ),
        (
            ["model.text={kind: prior, mlp_alpha: 0.5}"],
            "model.text.mlp_alpha=0.5 (used by kind 'mlp') does not apply to kind='prior', which takes only num_layers",
        ),
        (["model.image.num_layers=2"], "model.image.num_layers=2 (used by kind 'prior') does not apply to kind='mlp'"),
    ],
)
def test_a_setting_the_kind_does_not_use_is_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(message)


def test_a_yaml_setting_left_over_from_another_kind_names_the_way_out(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  image: {kind: mlp, mlp_ratio: 2}\n")
    way_out = r"model\.image\.mlp_ratio=2 .*kind='linear'.*--model\.image='\{kind: linear\}'"
    with pytest.raises(ValueError, match=way_out):
        load_config(path, ["model.image.kind=linear"])
    assert load_config(path, ["model.image={kind: linear}"]).model.image == {"kind": "linear"}  # the way out


@pytest.mark.parametrize("kind", ["prior", "mlp", "linear", "identity"])
def test_defaults_and_settings_the_kind_uses_load(kind: str) -> None:
    # The mapping holds only what was given, so AdapterConfig's defaults (mlp_ratio=4, ...) never trip the check.
    assert load_config(None, [f"model.text.kind={kind}"]).model.text == {"kind": kind}  # image: the default mlp
    used = {"prior": "num_layers=2", "mlp": "mlp_ratio=2", "linear": "bias=false", "identity": "in_dim=0"}[kind]
    key = used.split("=")[0]
    assert key in load_config(None, [f"model.text.kind={kind}", f"model.text.{used}"]).model.text


def test_a_resolved_config_reloads(tmp_path: Path) -> None:
    from csaligner.train import dump_yaml

    cfg = load_config(None, ["model.image={kind: linear, bias: false}", "model.text={kind: prior, num_layers: 2}"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))  # what a run writes as out_dir/config.yaml
    assert load_config(path) == cfg


def test_the_cli_refuses_a_flag_the_kind_does_not_use(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--model.text.kind=linear", "--model.text.mlp_ratio=8", "--print-config"]) == 1
    err = capsys.readouterr().err
    assert "csalign train: error: model.text.mlp_ratio=8 (used by kind 'mlp') does not apply to kind='linear'" in err
    assert main(["train", "--model.text.kind=linear", "--model.text.bias=false", "--print-config"]) == 0


@pytest.mark.parametrize("bias", ["true", "false"])
def test_an_mlp_bias_is_refused_once_the_features_make_the_widths_equal(tmp_path: Path, bias: str) -> None:
    """The mlp's bias sits on its side projection, the identity when in_dim == out_dim; the widths are inferred
    from the features, so the run (not the config) refuses it, before anything is written."""
    from csaligner.train import train
    from tests.train import helpers

    features = helpers.synthetic_features()  # text features 16-d
    overrides = helpers.fast_overrides(tmp_path / "run", "train.steps=1", "model.out_dim=16")
    config = load_config(None, [*overrides, f"model.text={{kind: mlp, bias: {bias}}}"])  # widths unknown yet
    with pytest.raises(ValueError) as err:
        train(config, features)
    assert str(err.value).startswith(
        f"model.text.bias={bias.title()} does not apply to kind='mlp' with in_dim=16, out_dim=16: its only place"
    )
    assert not (tmp_path / "run").exists()
    assert train(load_config(None, [*overrides, "model.image={kind: mlp, bias: false}"]), features).finished  # 24-d


def test_a_registered_adapter_kind_of_your_own_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The config accepted only the four built-in kinds, so `@register_adapter` kinds could not be trained."""
    import torch

    from csaligner.adapters import ADAPTERS, AdapterConfig, LinearAdapter
    from csaligner.train import train
    from tests.train import helpers

    class DoubledLinear(LinearAdapter):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

        @classmethod
        def from_config(cls, config: AdapterConfig) -> DoubledLinear:
            return cls(config.in_dim, config.out_dim, bias=config.bias)

    with pytest.raises(ValueError, match=r"model\.image\.kind must be one of .*registered with @register_adapter"):
        load_config(None, ["model.image={kind: doubled_linear}"])
    monkeypatch.setitem(ADAPTERS, "doubled_linear", DoubledLinear)  # as @register_adapter does, undone after
    overrides = helpers.fast_overrides(tmp_path, "train.steps=2", "model.image={kind: doubled_linear}")
    result = train(load_config(None, overrides), helpers.synthetic_features())
    assert result.finished and isinstance(result.metrics["loss"], float)


def test_a_subclass_of_your_own_is_told_to_list_its_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registered subclass inherits its base's `settings`; a field it reads beyond them is refused with the fix."""
    from csaligner.adapters import ADAPTERS, LinearAdapter

    class DroppedLinear(LinearAdapter):  # reads dropout, but inherits LinearAdapter.settings = ("bias",)
        pass

    monkeypatch.setitem(ADAPTERS, "dropped_linear", DroppedLinear)
    with pytest.raises(ValueError, match=r"DroppedLinear is your class: list every setting .* `settings`"):
        load_config(None, ["model.image={kind: dropped_linear, dropout: 0.1}"])
    with pytest.raises(ValueError, match=r"to kind='linear', which takes only bias") as err:
        load_config(None, ["model.image={kind: linear, dropout: 0.1}"])
    assert "your class" not in str(err.value)


def test_a_class_of_your_own_that_lists_its_settings_gets_no_inheritance_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """A class that declares `settings` itself inherits nothing: a setting outside them is the config's mistake."""
    from csaligner.adapters import ADAPTERS, LinearAdapter

    class OwnLinear(LinearAdapter):
        settings = ("bias",)

    monkeypatch.setitem(ADAPTERS, "own_linear", OwnLinear)
    with pytest.raises(ValueError, match=r"to kind='own_linear', which takes only bias") as err:
        load_config(None, ["model.image={kind: own_linear, dropout: 0.1}"])
    assert "your class" not in str(err.value)


def test_a_bad_adapter_value_names_the_side_that_held_it() -> None:
    """ "mlp_ratio must be a positive integer, got 0" did not say whether model.image or model.text held it."""
    from csaligner.train.config import ModelConfig
    from csaligner.train.model import adapter_configs

    config = ModelConfig(image={"kind": "mlp"}, text={"kind": "mlp", "mlp_ratio": 0}, out_dim=8)
    with pytest.raises(ValueError, match=r"^model\.text: mlp_ratio must be a positive integer, got 0"):
        adapter_configs(config, image_dim=16, text_dim=12)
