"""Frechet distance (closed forms, scipy reference) and the text-to-image prior metrics."""

from __future__ import annotations

import pytest
import torch

from csaligner.eval import frechet_distance, t2i_metrics


def test_identical_sets_have_zero_distance() -> None:
    x = torch.randn(200, 12)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(x, x[torch.randperm(200)]) == pytest.approx(0.0, abs=1e-8)


def test_shifted_standard_normals_give_squared_mean_distance() -> None:
    # N(0, I) vs N(mu, I): FD = ||mu||^2 + tr I + tr I - 2 tr I = ||mu||^2.
    mu = torch.tensor([1.0, -1.0, 0.5, 2.0])
    x = torch.randn(20_000, 4, dtype=torch.float64)
    y = torch.randn(20_000, 4, dtype=torch.float64) + mu
    assert frechet_distance(x, y) == pytest.approx(float(mu.pow(2).sum()), rel=0.03)


def test_scaled_isotropic_gaussians() -> None:
    # N(0, a^2 I) vs N(0, b^2 I): FD = D (a - b)^2, exactly when the sample covariances are exact.
    d = 3
    q = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64)).Q[:, :d] * (8 - 1) ** 0.5  # orthogonal columns
    x = q - q.mean(0)
    x = x @ torch.linalg.inv(torch.linalg.cholesky(x.T @ x / 7)).T  # sample covariance exactly I
    assert frechet_distance(2.0 * x, 0.5 * x) == pytest.approx(d * 1.5**2, rel=1e-9)


def test_matches_scipy_sqrtm_reference() -> None:
    linalg = pytest.importorskip("scipy.linalg")
    x = torch.randn(300, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    y = torch.randn(400, 6, dtype=torch.float64) * 2 + 1
    mx, my = x.mean(0).numpy(), y.mean(0).numpy()
    sx, sy = torch.cov(x.T).numpy(), torch.cov(y.T).numpy()
    covmean = linalg.sqrtm(sx @ sy).real
    reference = ((mx - my) ** 2).sum() + sx.trace() + sy.trace() - 2 * covmean.trace()
    assert frechet_distance(x, y) == pytest.approx(float(reference), rel=1e-8)


def test_more_dims_than_samples_stays_finite() -> None:
    x, y = torch.randn(10, 50), torch.randn(10, 50) + 1.0
    fd = frechet_distance(x, y)
    assert fd > 0 and fd == pytest.approx(frechet_distance(x, y))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_t2i_metrics_perfect_prior() -> None:
    image = torch.randn(40, 16)
    t2i = torch.randperm(40)
    out = t2i_metrics(image[t2i], image, t2i)
    assert list(out) == ["frechet_distance", "paired_cosine", "t2i_R@1", "t2i_R@5", "t2i_R@10"]
    assert out["frechet_distance"] == pytest.approx(0.0, abs=1e-6)
    assert out["paired_cosine"] == pytest.approx(1.0)
    assert out["t2i_R@1"] == 100.0


def test_t2i_metrics_noisy_prior_and_unpaired_text() -> None:
    image = torch.randn(40, 16)
    t2i = torch.cat([torch.arange(40), torch.tensor([-1])])
    mapped = torch.cat([image + 0.8 * torch.randn(40, 16), torch.randn(1, 16)])
    out = t2i_metrics(mapped, image, t2i, ks=(1, 40))
    assert 0 < out["t2i_R@1"] < 100 and out["t2i_R@40"] == 100.0
    assert 0.3 < out["paired_cosine"] < 0.95
    assert out["frechet_distance"] > 1.0


def test_errors() -> None:
    with pytest.raises(ValueError, match=">= 2 samples"):
        frechet_distance(torch.randn(1, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="unpaired"):
        t2i_metrics(torch.randn(3, 4), torch.randn(3, 4), -torch.ones(3, dtype=torch.long))
