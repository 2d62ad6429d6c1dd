"""Frechet distance between image sets, and `csalign fid`.

    csalign fid --generated OUT --reference REAL --inception-weights weights-inception-2015-12-05-6726825d.pth
    csalign fid --generated OUT --reference REAL --features efficientnet-lite0   # offline, not comparable

FID = ||mu_g - mu_r||^2 + tr(S_g) + tr(S_r) - 2 tr((S_g S_r)^{1/2}) between Gaussian fits of image
features, computed in float64. The COCO-30K protocol is in docs/DECODING.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from csaligner._validation import check_device
from csaligner.decode._deps import MissingDependencyError
from csaligner.decode.fid_features import (
    FEATURE_EXTRACTORS,
    ImageFeatureExtractor,
    build_feature_extractor,
    extract_folder,
)


def gaussian_stats(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64."""
    x = _as_float64(features)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must have shape (N, D) with N >= 2 to fit a covariance, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or Inf; check the images and the feature extractor")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet (2-Wasserstein) distance squared between N(mu1, sigma1) and N(mu2, sigma2).

    tr((S1 S2)^{1/2}) is computed as the sum of sqrt-eigenvalues of A S2 A with A = S1^{1/2}: that matrix
    is similar to S1 S2 but symmetric PSD, so `eigh` applies and no complex round-off arises (the usual
    scipy.linalg.sqrtm(S1 @ S2) route needs an eps retry and discards imaginary parts).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        shapes = [mu1.shape, s1.shape, mu2.shape, s2.shape]
        raise ValueError(f"need mu (D,) and sigma (D, D) for both sets with one D; got shapes {shapes}")
    a = _sqrt_psd(s1)
    eig = np.linalg.eigvalsh(a @ ((s2 + s2.T) / 2) @ a)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(value, 0.0)  # >= 0 exactly; only round-off makes it negative


def fid_from_features(generated: Tensor | np.ndarray, reference: Tensor | np.ndarray, method: str = "auto") -> float:
    """FID between two (N, D) feature sets, in float64.

    Args:
        generated: (N1, D) features.
        reference: (N2, D) features.
        method: "covariance" fits (D, D) covariances and calls `frechet_distance`; "samples" uses the exact
            identity tr((S1 S2)^{1/2}) = ||X1 X2^T||_* / sqrt((N1-1)(N2-1)) for centred X, an (N1, N2) SVD
            instead of (D, D) eigendecompositions; "auto" picks the cheaper (samples when few images).
    """
    mu1, s1 = gaussian_stats(generated)  # also validates both inputs
    x1 = _as_float64(generated)
    x2 = _as_float64(reference)
    if x1.shape[1] != x2.shape[1]:
        raise ValueError(f"feature dims differ: generated D={x1.shape[1]}, reference D={x2.shape[1]}")
    (n1, d), n2 = x1.shape, x2.shape[0]
    if method not in ("auto", "covariance", "samples"):
        raise ValueError(f"method must be 'auto', 'covariance' or 'samples', got {method!r}")
    if method == "covariance" or (method == "auto" and n1 * n2 * min(n1, n2) >= d**3):
        return frechet_distance(mu1, s1, *gaussian_stats(reference))
    mu2 = x2.mean(axis=0)
    c1, c2 = x1 - mu1, x2 - mu2
    tr_covmean = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    value = float(diff @ diff + (c1**2).sum() / (n1 - 1) + (c2**2).sum() / (n2 - 1) - 2.0 * tr_covmean)
    return max(value, 0.0)


def _as_float64(features: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(features, Tensor):
        return features.detach().cpu().double().numpy()
    return np.asarray(features, np.float64)


@dataclass
class FIDResult:
    """One FID measurement and what it was measured with.

    Attributes:
        value: the distance.
        label: the metric's name for reports, e.g. "FID-EfficientNet (not comparable to Inception FID)".
        features: extractor name in FEATURE_EXTRACTORS.
        n_generated: images in the generated folder.
        n_reference: images in the reference folder.
        dim: feature width D; with fewer images than D the covariances are rank-deficient and FID is biased.
    """

    value: float
    label: str
    features: str
    n_generated: int
    n_reference: int
    dim: int


def compute_fid(
    generated: str | Path,
    reference: str | Path,
    features: str | ImageFeatureExtractor = "inception",
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    weights_path: str | Path | None = None,
) -> FIDResult:
    """FID between the images in two folders.

    Args:
        generated: folder of generated images.
        reference: folder of real images.
        features: a FEATURE_EXTRACTORS name ("inception", "efficientnet-lite0") or an extractor.
        device: where the extractor runs.
        batch_size: images per forward pass.
        weights_path: local weights for a named extractor (Inception: the FID weights file).

    Raises:
        ValueError: a folder holds no images, or images that do not decode (all listed, with the folder's role).
    """
    extractor = build_feature_extractor(features, device, weights_path) if isinstance(features, str) else features
    gen = extract_folder(generated, extractor, batch_size, role="generated")
    ref = extract_folder(reference, extractor, batch_size, role="reference")
    for role, folder, feats in (("--generated", generated, gen), ("--reference", reference, ref)):
        if feats.shape[0] < 2:  # a covariance needs two images; say which folder, not only the shape
            raise ValueError(f"{role} {folder} holds {feats.shape[0]} image(s); FID fits a covariance and needs >= 2")
    return FIDResult(
        value=fid_from_features(gen, ref),
        label=extractor.label,
        features=extractor.name,
        n_generated=gen.shape[0],
        n_reference=ref.shape[0],
        dim=gen.shape[1],
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fid",
        help="Frechet distance between a folder of generated images and a folder of real ones",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--generated", required=True, type=Path, help="folder of generated images (e.g. generate's --out)")
    p.add_argument("--reference", required=True, type=Path, help="folder of real images to compare against")
    p.add_argument(
        "--features",
        default="inception",
        choices=sorted(FEATURE_EXTRACTORS),
        help="image features the FID is computed on (default inception)",
    )
    p.add_argument("--inception-weights", type=Path, help="local FID InceptionV3 weights file (torch-fidelity's)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device to run on (default cuda when available, else cpu)",
    )
    p.add_argument("--out", type=Path, help="also write the result as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_device("--device", args.device)
    weights = args.inception_weights if args.features == "inception" else None
    try:
        result = compute_fid(
            args.generated,
            args.reference,
            args.features,
            device=args.device,
            batch_size=args.batch_size,
            weights_path=weights,
        )
    except MissingDependencyError as err:
        print(f"csalign fid: error: {err}", file=sys.stderr)
        return 1
    print(f"{result.label}: {result.value:.4f} ({result.n_generated} generated vs {result.n_reference} reference)")
    if min(result.n_generated, result.n_reference) <= result.dim:
        print(
            f"csalign fid: note: fewer images than feature dims ({result.dim}); the covariances are rank-deficient "
            "and FID is biased upward; compare only runs with the same image counts",
            file=sys.stderr,
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(asdict(result), indent=2))
    return 0
