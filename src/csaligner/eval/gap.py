"""Modality-gap metrics: how far apart the image and text embedding distributions sit.

InfoNCE aligns pairs but leaves the two modalities in separate cones of the unit sphere (Liang
et al. 2022, "Mind the Gap"); CS-Aligner's claim is that adding D_CS closes that gap. These
numbers make the claim checkable. Everything is computed on L2-normalised features, so distances
lie in [0, 2].

Keys returned by `modality_gap_metrics`:

- "centroid_distance": ||mean(image) - mean(text)|| over all rows (Liang et al.'s gap vector norm).
- "paired_distance": mean ||x_i - y_i|| over (image, caption) pairs (needs text_to_image).
- "paired_cosine": mean cosine of those pairs (needs text_to_image).
- "random_pair_distance": mean ||x - y|| over all cross pairs of the subsamples; the reference a
  paired distance should beat.
- "cs_divergence": D_CS(image, text) with bandwidth sigma on the subsamples (0 = same KDE).
- "alignment": Wang & Isola (2020) E||x - y||^2 over pairs (alpha = 2; lower is better).
- "uniformity_image", "uniformity_text", "uniformity_joint": log E exp(-2 ||a - b||^2) over
  distinct pairs of one modality, or of the pooled subsamples (lower = more uniform).
- "linear_separability": held-out accuracy of a logistic regression telling image from text
  embeddings, on balanced classes (0.5 = indistinguishable, 1.0 = fully separated).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from csaligner._autocast import autocast_off
from csaligner._validation import check_features, check_positive, check_same_dim
from csaligner.eval._common import check_index, compute_dtype, subsample_rows, unit_rows
from csaligner.eval._logreg import fit_logistic_regression
from csaligner.losses.divergence import cs_divergence, squared_distances

_BLOCK = 1024  # rows per (block, n) distance matrix in the pairwise reductions


@autocast_off
def uniformity(x: Tensor, t: float = 2.0) -> float:
    """Wang & Isola uniformity log E_{i<j} exp(-t ||x_i - x_j||^2), blockwise in the log domain.

    Args:
        x: (n, D) features (n >= 2), used as given.
        t: the kernel scale (2 in the paper).
    """
    check_features("x", x)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"uniformity needs at least 2 samples, got {n}")
    parts = []
    for start in range(0, n, _BLOCK):
        rows = torch.arange(start, min(start + _BLOCK, n), device=x.device)
        logits = -t * squared_distances(x[rows], x).double()  # (block, n); float64 so log(count) cancels exactly
        upper = torch.arange(n, device=x.device).unsqueeze(0) > rows.unsqueeze(1)  # distinct pairs i < j
        parts.append(torch.logsumexp(logits.masked_fill(~upper, float("-inf")).flatten(), 0))
    return float(torch.logsumexp(torch.stack(parts), 0)) - math.log(n * (n - 1) / 2)


@autocast_off
def mean_cross_distance(x: Tensor, y: Tensor) -> float:
    """Mean Euclidean distance over all (x_i, y_j) pairs, blockwise. x (n, D), y (m, D)."""
    check_features("x", x)
    check_features("y", y)
    check_same_dim("x", x, "y", y)
    total = 0.0
    for start in range(0, x.shape[0], _BLOCK):
        total += float(squared_distances(x[start : start + _BLOCK], y).sqrt().double().sum())
    return total / (x.shape[0] * y.shape[0])


@autocast_off
def linear_separability(image: Tensor, text: Tensor, generator: torch.Generator, steps: int = 100) -> float:
    """Held-out accuracy of image-vs-text logistic regression on balanced, stratified halves.

    Args:
        image: (n, D) features; text: (m, D) features; both need n, m >= 2.
        generator: CPU generator for the balancing subsample and the split.
        steps: L-BFGS iterations.
    """
    # Non-finite rows would stop the probe at its zero start: one class predicted for all, 0.5 reported.
    check_features("image", image)
    check_features("text", text)
    check_same_dim("image", image, "text", text)
    n = min(image.shape[0], text.shape[0])
    if n < 2:
        raise ValueError(
            f"linear separability needs >= 2 images and >= 2 texts, got {image.shape[0]} and {text.shape[0]}"
        )
    img = image[torch.randperm(image.shape[0], generator=generator)[:n].to(image.device)]
    txt = text[torch.randperm(text.shape[0], generator=generator)[:n].to(text.device)]
    half = n // 2  # per modality: [0, half) trains, [half, n) tests, so both halves stay balanced
    train = torch.cat([img[:half], txt[:half]])
    test = torch.cat([img[half:], txt[half:]])
    train_y = torch.cat([torch.zeros(half), torch.ones(half)]).long().to(image.device)
    test_y = torch.cat([torch.zeros(n - half), torch.ones(n - half)]).long().to(image.device)
    probe = fit_logistic_regression(train, train_y, num_classes=2, steps=steps)
    return float((probe.predict(test).to(test_y.device) == test_y).double().mean())


@autocast_off
def modality_gap_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor | None = None,
    sigma: float = 1.0,
    max_samples: int = 5000,
    seed: int = 0,
) -> dict[str, float]:
    """Modality-gap statistics of image and text embeddings (see the module docstring for keys).

    Centroid and paired terms use every row; the pairwise terms (random-pair distance, D_CS,
    uniformity, separability) use a seeded subsample of at most `max_samples` rows per modality.

    Args:
        image_emb: (N, D) image embeddings (normalised here).
        text_emb: (M, D) text embeddings in the same space.
        text_to_image: optional (M,) image row of each text (-1 = unpaired); enables the paired keys.
        sigma: Gaussian bandwidth of D_CS on unit-norm features (the training default is 1.0).
        max_samples: subsample size per modality for the O(n^2) terms.
        seed: seed of the subsample and of the separability split.

    Returns:
        dict of floats; "paired_distance", "paired_cosine" and "alignment" only with text_to_image.
    """
    check_features("image_emb", image_emb)
    check_features("text_emb", text_emb)
    check_same_dim("image_emb", image_emb, "text_emb", text_emb)
    check_positive("sigma", sigma)
    if int(max_samples) < 2:
        raise ValueError(f"max_samples must be >= 2 (pairwise statistics), got {max_samples}")
    dtype = compute_dtype(image_emb, text_emb)
    image, text = unit_rows(image_emb, dtype), unit_rows(text_emb.to(image_emb.device), dtype)
    out = {"centroid_distance": float((image.mean(0) - text.mean(0)).norm())}
    if text_to_image is not None:
        out.update(_paired_terms(image, text, text_to_image))
    gen = torch.Generator().manual_seed(int(seed))
    xs = image[subsample_rows(image.shape[0], int(max_samples), gen).to(image.device)]
    ys = text[subsample_rows(text.shape[0], int(max_samples), gen).to(text.device)]
    out["random_pair_distance"] = mean_cross_distance(xs, ys)
    out["cs_divergence"] = float(cs_divergence(xs, ys, sigma=sigma))
    out["uniformity_image"] = uniformity(xs)
    out["uniformity_text"] = uniformity(ys)
    out["uniformity_joint"] = uniformity(torch.cat([xs, ys]))
    out["linear_separability"] = linear_separability(xs, ys, gen)
    return out


def _paired_terms(image: Tensor, text: Tensor, text_to_image: Tensor) -> dict[str, float]:
    """Paired distance, cosine and alignment over the texts that have an image."""
    t2i = check_index("text_to_image", text_to_image, text.shape[0], image.shape[0], device=image.device)
    paired = t2i >= 0
    if not bool(paired.any()):
        raise ValueError("text_to_image marks every text as unpaired (-1); pass None to skip the paired metrics")
    x, y = image[t2i[paired]], text[paired]  # (P, D) each caption beside its image
    d2 = (x - y).pow(2).sum(1)
    return {
        "paired_distance": float(d2.sqrt().mean()),
        "paired_cosine": float((x * y).sum(1).mean()),
        "alignment": float(d2.mean()),
    }
