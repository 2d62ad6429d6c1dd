"""Frechet distance against closed forms and a scipy sqrtm reference; FID over folders; `csalign fid`."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from csaligner.cli import main
from csaligner.decode import compute_fid, fid_from_features, frechet_distance, gaussian_stats
from csaligner.decode.fid_features import FEATURE_EXTRACTORS, INCEPTION_WEIGHTS_URL

pytest.importorskip("PIL")


def random_psd(d: int, rank: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((d, rank))
    return a @ a.T / rank


def naive_frechet(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """The textbook route (pytorch-fid): scipy sqrtm of the non-symmetric product, real part."""
    linalg = pytest.importorskip("scipy.linalg")
    covmean = linalg.sqrtm(s1 @ s2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_one_dimensional_closed_form() -> None:
    m1, v1, m2, v2 = 0.3, 2.0, -1.2, 0.5
    expected = (m1 - m2) ** 2 + v1 + v2 - 2 * np.sqrt(v1 * v2)
    assert frechet_distance(np.array([m1]), np.array([[v1]]), np.array([m2]), np.array([[v2]])) == pytest.approx(
        expected, rel=1e-12
    )


def test_diagonal_covariances_closed_form() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    v1, v2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("rank", [20, 5])  # full rank, and rank-deficient as with fewer images than dims
def test_matches_scipy_sqrtm_reference(rank: int) -> None:
    rng = np.random.default_rng(rank)
    s1, s2 = random_psd(12, rank, rng), random_psd(12, rank, rng)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(naive_frechet(mu1, s1, mu2, s2), rel=1e-6, abs=1e-8)


def test_properties_on_features() -> None:
    x, y = torch.randn(200, 8, dtype=torch.float64), torch.randn(150, 8, dtype=torch.float64) * 1.5
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-9)
    assert fid_from_features(x, y) == pytest.approx(fid_from_features(y, x), rel=1e-9)
    shift = torch.full((8,), 0.7, dtype=torch.float64)
    assert fid_from_features(x + shift, x) == pytest.approx(float(shift @ shift), rel=1e-9)  # pure mean shift


@pytest.mark.parametrize("n1,n2,d", [(5, 7, 16), (40, 30, 6), (3, 200, 10)])
def test_sample_route_equals_covariance_route(n1: int, n2: int, d: int) -> None:
    """The (N1, N2) nuclear-norm identity gives the same FID as (D, D) covariances, few or many images."""
    x, y = torch.randn(n1, d) * 2 + 1, torch.randn(n2, d)
    covariance = fid_from_features(x, y, method="covariance")
    # rank-deficient covariances leave ~1e-16 eigenvalues whose square roots (~1e-8) the sample route never sees
    assert fid_from_features(x, y, method="samples") == pytest.approx(covariance, rel=1e-7)
    assert fid_from_features(x, y) == pytest.approx(covariance, rel=1e-7)


def test_gaussian_stats_is_float64_unbiased() -> None:
    x = torch.randn(50, 3)
    mu, sigma = gaussian_stats(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(x.double().numpy(), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(torch.randn(1, 3))
    with pytest.raises(ValueError, match="with one D"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


class ColourStats:
    """A 6-d toy extractor (per-channel mean and std) to test folder plumbing without a network."""

    name = "colour-stats"
    label = "FID-colour (toy)"

    def __call__(self, images: list[Any]) -> Tensor:
        x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in images]) / 255
        return torch.cat([x.mean(dim=(1, 2)), x.std(dim=(1, 2))], dim=1)


def test_compute_fid_over_folders(tmp_path: Path, write_images: Any) -> None:
    write_images(tmp_path / "a", 12, seed=0)
    write_images(tmp_path / "b", 12, seed=1)
    write_images(tmp_path / "noise", 12, seed=2, kind="noise")
    same = compute_fid(tmp_path / "a", tmp_path / "a", ColourStats())
    near = compute_fid(tmp_path / "a", tmp_path / "b", ColourStats())
    far = compute_fid(tmp_path / "a", tmp_path / "noise", ColourStats())
    assert same.value == pytest.approx(0.0, abs=1e-9)
    assert 0 < near.value < far.value
    assert (far.n_generated, far.n_reference, far.dim, far.label) == (12, 12, 6, "FID-colour (toy)")
    with pytest.raises(ValueError, match=re.escape(f"the reference folder {tmp_path} holds no images")):
        compute_fid(tmp_path / "a", tmp_path, ColourStats())
    with pytest.raises(FileNotFoundError, match=r"the generated folder .*missing: no such folder; .* as --generated"):
        compute_fid(tmp_path / "missing", tmp_path / "a", ColourStats())
    an_image = sorted((tmp_path / "a").iterdir())[0]
    with pytest.raises(FileNotFoundError, match=r"a file, not a folder; .* as --reference"):
        compute_fid(tmp_path / "a", an_image, ColourStats())


def test_cli_efficientnet_fid(tmp_path: Path, write_images: Any, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    write_images(tmp_path / "a", 6, seed=0)
    write_images(tmp_path / "b", 6, seed=1)
    write_images(tmp_path / "noise", 6, seed=2, kind="noise")
    results = {}
    for other in ("b", "noise"):
        out = tmp_path / f"fid_{other}.json"
        args = ["fid", "--generated", str(tmp_path / "a"), "--reference", str(tmp_path / other)]
        assert main([*args, "--features", "efficientnet-lite0", "--device", "cpu", "--out", str(out)]) == 0
        results[other] = json.loads(out.read_text())
        printed = capsys.readouterr()
        assert printed.out.startswith("FID-EfficientNet (not comparable to Inception FID): ")
        assert "rank-deficient" in printed.err  # 6 images, 1280 dims
    assert results["b"]["dim"] == 1280 and results["b"]["features"] == "efficientnet-lite0"
    assert 0 < results["b"]["value"] < results["noise"]["value"]


def test_inception_needs_local_weights(tmp_path: Path, write_images: Any, capsys: pytest.CaptureFixture[str]) -> None:
    write_images(tmp_path / "a", 2, seed=0)
    args = ["fid", "--generated", str(tmp_path / "a"), "--reference", str(tmp_path / "a")]
    assert main(args) == 1
    assert INCEPTION_WEIGHTS_URL in capsys.readouterr().err
    if "inception" in FEATURE_EXTRACTORS:
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            (tmp_path / "w.pth").write_bytes(b"")
            assert main([*args, "--inception-weights", str(tmp_path / "w.pth")]) == 1
            assert "pip install 'torch-fidelity'" in capsys.readouterr().err


def _flickr_images() -> list[Path]:
    root = Path(os.environ.get("CSALIGN_DATA", Path(__file__).parents[3] / "shared" / "data")) / "flickr8k" / "images"
    return sorted(root.glob("*.jpg")) if root.is_dir() else []


@pytest.mark.skipif(not _flickr_images(), reason="Flickr8k images not found (set CSALIGN_DATA)")
def test_efficientnet_fid_ranks_real_photos_closer_than_noise(tmp_path: Path, write_images: Any) -> None:
    """On real photos: two disjoint photo sets are closer to each other than photos are to noise."""
    pytest.importorskip("efficientnet_lite_pytorch")
    photos = random.Random(0).sample(_flickr_images(), 16)
    for name, chunk in (("a", photos[:8]), ("b", photos[8:])):
        (tmp_path / name).mkdir()
        for p in chunk:
            (tmp_path / name / p.name).symlink_to(p)
    write_images(tmp_path / "noise", 8, seed=3, size=64, kind="noise")
    photos_fid = compute_fid(tmp_path / "a", tmp_path / "b", "efficientnet-lite0").value
    noise_fid = compute_fid(tmp_path / "a", tmp_path / "noise", "efficientnet-lite0").value
    assert photos_fid < noise_fid
