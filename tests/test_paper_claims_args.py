"""experiments/paper_claims.py's argument checks (the script itself trains for hours; not run here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "paper_claims.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("paper_claims", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while they are built
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_token_weights_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    claims = load_script()
    assert claims.parse_args(["--token-lams", "1,10"]).token_lams == [1.0, 10.0]
    with pytest.raises(SystemExit):
        claims.parse_args(["--token-lams", "0,1"])
    assert "--token-lams must all be > 0, got [0.0, 1.0]" in capsys.readouterr().err


def test_unknown_claims_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_script().parse_args(["--claims", "1,9"])
    assert "unknown claims ['9']" in capsys.readouterr().err
