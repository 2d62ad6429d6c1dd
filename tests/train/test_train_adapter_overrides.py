"""`model.image` / `model.text` overrides: tune the default adapter, reject unknown adapter keys early."""

from __future__ import annotations

from pathlib import Path

import pytest

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
