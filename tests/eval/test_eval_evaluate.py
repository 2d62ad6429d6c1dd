"""evaluate_run's token-level metric against a direct computation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tests.train.helpers import fast_overrides, synthetic_features

from csaligner.data.features import PairedFeatures
from csaligner.eval.evaluate import evaluate_run, token_metrics
from csaligner.losses import token_cs_divergence
from csaligner.train import load_config, train
from csaligner.train.model import load_adapters


def _trained_run(tmp_path: Path) -> tuple[Path, PairedFeatures]:
    feats = synthetic_features(tokens=True)
    overrides = fast_overrides(tmp_path / "run", "train.steps=3", "data.use_tokens=true", "loss.token_lam=0.1")
    return train(load_config(None, overrides), feats).run_dir, feats


def test_token_metric_matches_a_direct_computation(tmp_path: Path) -> None:
    run_dir, feats = _trained_run(tmp_path)
    got = token_metrics(run_dir, feats, sigma=1.0, batch_size=7)["token_cs_divergence"]  # uneven chunks
    adapters = load_adapters(run_dir, "cpu")
    t2i = feats.text_to_image
    values = []
    with torch.no_grad():
        for i in range(feats.num_images):
            caps = (t2i == i).nonzero().flatten()
            if caps.numel() == 0:
                continue  # the 2 caption-less images
            c = int(caps.min())
            x = F.normalize(adapters.image(feats.image_tokens[i]), dim=-1)
            words = feats.text_tokens[c][feats.text_token_mask[c]]
            y = F.normalize(adapters.text(words), dim=-1)
            values.append(token_cs_divergence(x[None], y[None], sigma=1.0))
    assert len(values) == feats.num_images - 2
    assert abs(got - float(torch.stack(values).mean())) < 1e-5


def test_evaluate_run_reports_the_token_metric_only_with_tokens(tmp_path: Path) -> None:
    run_dir, feats = _trained_run(tmp_path)
    with_tokens = evaluate_run(run_dir, feats)
    assert with_tokens["token_cs_divergence"] >= -1e-6
    feats.image_tokens = None
    assert "token_cs_divergence" not in evaluate_run(run_dir, feats)


@pytest.mark.parametrize(
    ("trained", "evaluated", "warned"),
    [
        ("flickr8k:dev:100", "flickr8k:dev", True),  # the first 100 dev images are in both
        ("flickr8k:dev", "flickr8k:dev:50", True),
        ("flowers:test:20", "flowers:test", True),
        ("flickr8k:train:2000", "flickr8k:dev", False),  # another split: held out
        ("flickr8k:dev", "flickr8k:dev", False),  # the same data: trained_on's warning, not this one
        ("/data/m.tsv", "/data/m.tsv:3", False),  # manifests are not compared
    ],
)
def test_a_run_trained_on_a_slice_of_the_evaluated_split_is_found(
    trained: str, evaluated: str, warned: bool, tmp_path: Path
) -> None:
    """Trained on flickr8k:dev:100 and evaluated on flickr8k:dev gave no warning: only identical data did."""
    import json

    from csaligner.eval.evaluate import shares_builtin_split

    manifest = {"flickr8k:dev": "m-dev"}  # the same spec has the same manifest hash, another one another hash
    (tmp_path / "summary.json").write_text(
        json.dumps({"data": {"source": trained, "manifest": manifest.get(trained, trained)}})
    )
    meta = {"source": evaluated, "manifest": manifest.get(evaluated, evaluated)}
    assert shares_builtin_split(tmp_path, meta) == (trained if warned else None)
    assert shares_builtin_split(tmp_path / "no-summary", meta) is None
