"""Modality-gap metrics: exact values on point masses, and identical vs shifted distributions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import csaligner.eval.gap as gap
from csaligner.eval import modality_gap_metrics, uniformity

E = torch.eye(4)


def test_point_masses_exact_values() -> None:
    n = 6
    image, text = E[0].repeat(n, 1), E[1].repeat(n, 1)  # every image at e0, every caption at e1
    out = modality_gap_metrics(image, 3.0 * text, text_to_image=torch.arange(n))  # scale is normalised away
    assert out["centroid_distance"] == pytest.approx(math.sqrt(2))
    assert out["paired_distance"] == pytest.approx(math.sqrt(2))
    assert out["random_pair_distance"] == pytest.approx(math.sqrt(2))
    assert out["paired_cosine"] == pytest.approx(0.0)
    assert out["alignment"] == pytest.approx(2.0)
    # D_CS of two point masses at squared distance 2, sigma 1: 0 + 0 - 2 * (-2 / 2) = 2.
    assert out["cs_divergence"] == pytest.approx(2.0, abs=1e-5)
    assert out["uniformity_image"] == pytest.approx(0.0) and out["uniformity_text"] == pytest.approx(0.0)
    # Pooled: n(n-1) same-point pairs (kernel 1) and n^2 cross pairs (exp(-2 * 2)) out of n(2n-1).
    expected_joint = math.log((n * (n - 1) + n * n * math.exp(-4)) / (n * (2 * n - 1)))
    assert out["uniformity_joint"] == pytest.approx(expected_joint)
    assert out["linear_separability"] == 1.0


def test_paired_keys_need_text_to_image() -> None:
    out = modality_gap_metrics(torch.randn(20, 8), torch.randn(30, 8))
    assert not {"paired_distance", "paired_cosine", "alignment"} & set(out)
    assert set(out) == {
        "centroid_distance", "random_pair_distance", "cs_divergence", "uniformity_image",
        "uniformity_text", "uniformity_joint", "linear_separability",
    }  # fmt: skip


def test_unpaired_texts_are_left_out_of_paired_terms() -> None:
    image = torch.stack([E[0], E[1]])
    text = torch.stack([E[0], E[1], E[2]])
    out = modality_gap_metrics(image, text, text_to_image=torch.tensor([0, 1, -1]))
    assert out["paired_distance"] == 0.0 and out["alignment"] == 0.0


def cloud(n: int, d: int = 8, shift: float = 0.0) -> Tensor:
    x = torch.randn(n, d)
    x[:, 0] += shift
    return x


def test_identical_distributions_show_no_gap() -> None:
    out = modality_gap_metrics(cloud(600), cloud(600), sigma=1.0)
    assert out["centroid_distance"] < 0.1
    assert abs(out["cs_divergence"]) < 0.01
    assert abs(out["linear_separability"] - 0.5) < 0.08
    assert out["uniformity_joint"] == pytest.approx(out["uniformity_image"], abs=0.05)


def test_shifted_distributions_show_a_gap() -> None:
    same = modality_gap_metrics(cloud(600), cloud(600))
    image = cloud(600, shift=3.0)
    text = cloud(600, shift=-3.0)
    shifted = modality_gap_metrics(image, text, text_to_image=torch.arange(600))
    assert shifted["centroid_distance"] > 1.0 > 10 * same["centroid_distance"]
    assert shifted["cs_divergence"] > 0.5 > 10 * abs(same["cs_divergence"])
    assert shifted["linear_separability"] > 0.97
    assert shifted["uniformity_joint"] > max(shifted["uniformity_image"], shifted["uniformity_text"]) - 1.0
    assert shifted["paired_distance"] == pytest.approx(shifted["random_pair_distance"], rel=0.05)  # pairs are random


def test_subsample_is_seeded() -> None:
    image, text = cloud(300), cloud(300, shift=0.5)
    a = modality_gap_metrics(image, text, max_samples=100, seed=1)
    assert a == modality_gap_metrics(image, text, max_samples=100, seed=1)
    assert a != modality_gap_metrics(image, text, max_samples=100, seed=2)


def naive_uniformity(x: Tensor, t: float = 2.0) -> float:
    n = x.shape[0]
    values = [math.exp(-t * float((x[i] - x[j]).pow(2).sum())) for i in range(n) for j in range(i + 1, n)]
    return math.log(sum(values) / len(values))


def test_uniformity_blockwise_matches_naive(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.nn.functional.normalize(torch.randn(23, 5, dtype=torch.float64), dim=1)
    monkeypatch.setattr(gap, "_BLOCK", 4)
    assert uniformity(x) == pytest.approx(naive_uniformity(x), rel=1e-9)
    assert gap.mean_cross_distance(x[:10], x[10:]) == pytest.approx(float(torch.cdist(x[:10], x[10:]).mean()))


def test_errors() -> None:
    with pytest.raises(ValueError, match="sigma"):
        modality_gap_metrics(torch.randn(4, 3), torch.randn(4, 3), sigma=0.0)
    with pytest.raises(ValueError, match="max_samples"):
        modality_gap_metrics(torch.randn(4, 3), torch.randn(4, 3), max_samples=1)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        modality_gap_metrics(torch.randn(4, 3), torch.randn(4, 3), text_to_image=torch.arange(3))


def test_public_helpers_refuse_non_finite_or_empty_features() -> None:
    # A diverged model's NaN/Inf embeddings made the L-BFGS probe stop at its zero start, predict one
    # class for every row and report 0.5: "image and text indistinguishable", the best possible gap.
    bad = torch.randn(20, 4)
    bad[3, 1] = float("inf")
    good = torch.randn(20, 4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        gap.linear_separability(bad, good, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="NaN or Inf"):
        gap.linear_separability(good, torch.full((20, 4), float("nan")), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="NaN or Inf"):
        uniformity(bad)
    with pytest.raises(ValueError, match="NaN or Inf"):
        gap.mean_cross_distance(good, bad)
    with pytest.raises(ValueError, match="empty"):
        gap.mean_cross_distance(torch.empty(0, 4), good)  # was a ZeroDivisionError
