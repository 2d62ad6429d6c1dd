"""Degenerate training is warned about: a vanished gradient with the loss far from 0, or collapsed embeddings."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from csaligner.data.features import PairedFeatures
from csaligner.train import load_config, train
from csaligner.train.monitor import collapsed_embeddings, degenerate_row
from tests.train.helpers import fast_overrides


def test_a_vanished_gradient_far_from_the_minimum_is_degenerate() -> None:
    row = {"step": 20, "loss": 6.93, "grad_norm": 3e-8}
    assert "at step 20 the gradient norm is 3e-08 while the loss is still 6.93" in str(degenerate_row(row))
    assert degenerate_row({**row, "grad_norm": 0.003}) is None  # small but alive
    assert degenerate_row({**row, "loss": 1e-3}) is None  # at the minimum a gradient may vanish
    assert degenerate_row({"step": 20, "loss": 6.93}) is None  # grad_clip=0 logs no norm: nothing to judge


def test_embeddings_at_one_point_are_collapsed() -> None:
    spread = torch.randn(64, 8)
    assert collapsed_embeddings({"image": spread, "text": spread + 1}) is None
    one_point = torch.ones(64, 8) * 3 + 1e-6 * torch.randn(64, 8)
    assert "the text adapter maps all 64 training rows checked to one point" in str(
        collapsed_embeddings({"image": spread, "text": one_point})
    )
    overflowed = torch.full((64, 8), 3e38)  # the norm overflows, so the loss's normalised embeddings are all 0
    assert "one point" in str(collapsed_embeddings({"image": overflowed, "text": spread}))
    assert "NaN or Inf" in str(collapsed_embeddings({"image": spread, "text": torch.full((4, 8), float("nan"))}))


def test_embeddings_on_one_line_on_both_sides_are_collapsed() -> None:
    """Dimensional collapse, as `--train.lr=10` on Flickr8k left both sides: spread out, but along one direction."""
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(64, 8, generator=g)
    along = torch.randn(64, 1, generator=g) * torch.ones(1, 8) + 0.05 * torch.randn(64, 8, generator=g)
    said = str(collapsed_embeddings({"image": along, "text": along.flip(1) + 0.1}))
    assert "the adapters map the training rows checked onto nearly one line (image 9" in said
    assert collapsed_embeddings({"image": along, "text": spread}) is None  # one side alone: e.g. an early prior
    assert collapsed_embeddings({"image": spread[:, :2], "text": spread[:, :2]}) is None  # a 2-d circle is no line
    assert collapsed_embeddings({"image": along[:8], "text": along[:8]}) is None  # too few rows to judge


def degenerate_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "training went degenerate" in str(w.message)]


@pytest.mark.parametrize("clip", ["train.grad_clip=1.0", "train.grad_clip=0"])
def test_a_run_that_collapses_warns_and_records_it(tmp_path: Path, features: PairedFeatures, clip: str) -> None:
    """lr=1e3 "succeeded": the outputs overflow, InfoNCE sits at log(batch), the gradient at 0, and no word said."""
    config = load_config(None, fast_overrides(tmp_path, "train.epochs=5", "train.lr=1e3", clip))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(config, features)
    assert result.finished
    said = degenerate_warnings(caught)
    assert len(said) == 1 and "Lower train.lr (now 1000) and train again" in said[0]
    # With a logged gradient norm it is caught while training; without one, on the saved adapters.
    assert ("the gradient norm is" in said[0]) == (clip == "train.grad_clip=1.0")
    assert json.loads((tmp_path / "summary.json").read_text())["warnings"] == said


def test_a_normal_run_gets_no_warning(tmp_path: Path, features: PairedFeatures) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(load_config(None, fast_overrides(tmp_path, "train.epochs=15")), features)
    assert degenerate_warnings(caught) == []
    assert "warnings" not in json.loads((tmp_path / "summary.json").read_text())


def test_the_end_of_run_check_runs_where_the_features_are() -> None:
    """The final adapters' sample forward ran on the CPU copy saved to disk: with flickr8k_tokens.yaml's prior
    adapter (10 blocks over 1,024 texts x 77 tokens) that was 39 s of CPU time after a GPU run, on 2 cores.
    Here the features live on the meta device: the pass must run there, not copy them out (which meta refuses)."""
    from csaligner.adapters import build_adapter
    from csaligner.adapters.config import AdapterConfig
    from csaligner.train.loop import _sample_outputs
    from csaligner.train.model import AlignmentModel
    from csaligner.train.step import DeviceFeatures

    prior = AdapterConfig(kind="prior", in_dim=6, out_dim=8, num_layers=1, num_heads=2, head_dim=4, max_text_tokens=5)
    model = AlignmentModel(build_adapter(AdapterConfig(kind="linear", in_dim=8, out_dim=8)), build_adapter(prior))
    meta = torch.device("meta")
    feats = DeviceFeatures(
        torch.randn(4, 8, device=meta),
        torch.randn(5, 6, device=meta),
        text_tokens=torch.randn(5, 5, 6, device=meta),
        text_token_mask=torch.ones(5, 5, dtype=torch.bool, device=meta),
    )
    out = _sample_outputs(model, feats)
    assert out["image"].device == meta and out["text"].device == meta
    assert out["image"].shape == (4, 8) and out["text"].shape == (5, 8)
