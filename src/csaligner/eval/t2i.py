"""Text-to-image prior metrics: a text adapter mapping captions into a frozen image space.

A prior (Eclipse, unCLIP) is good when its outputs look like real image embeddings as a
distribution (Frechet distance), sit close to their own image (paired cosine) and retrieve it
(T2I recall).

Frechet distance numerics. FD = ||mu_x - mu_y||^2 + tr S_x + tr S_y - 2 tr (S_x^1/2 S_y S_x^1/2)^1/2.
Everything is float64. S_x^1/2 comes from `eigh` of the symmetric S_x (negative round-off
eigenvalues clamped to 0), and tr(...)^1/2 is the sum of square roots of the eigenvalues of the
symmetric PSD product S_x^1/2 S_y S_x^1/2 (the same trace as scipy's sqrtm(S_x S_y), without a
non-symmetric square root and its complex round-off). When D exceeds the number of samples the
covariances are singular; the formula stays defined (PSD square roots need no inverse) so no
ridge is added, but the estimate is then strongly biased upwards (the bias shrinks like 1/n):
compare FDs only at equal sample sizes. A result below 0 from round-off is clamped to 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from csaligner._autocast import autocast_off
from csaligner._validation import check_features, check_same_dim
from csaligner.eval._common import check_chunk_size, check_index, check_ks, compute_dtype, unit_rows
from csaligner.eval.retrieval import TieRule, recall_at_k, text_query_ranks


def _psd_sqrt(a: Tensor) -> Tensor:
    """Square root of a symmetric PSD matrix via eigh (negative round-off eigenvalues -> 0)."""
    evals, evecs = torch.linalg.eigh(a)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def _gaussian_fit(x: Tensor) -> tuple[Tensor, Tensor]:
    x64 = x.detach().double()
    centred = x64 - x64.mean(0)
    return x64.mean(0), centred.T @ centred / (x64.shape[0] - 1)


@autocast_off
def frechet_distance(x: Tensor, y: Tensor) -> float:
    """Frechet distance between Gaussians fitted to x (n, D) and y (m, D), features as given.

    See the module docstring for the numerics. n, m >= 2.
    """
    check_features("x", x)
    check_features("y", y)
    check_same_dim("x", x, "y", y)
    if min(x.shape[0], y.shape[0]) < 2:
        raise ValueError(
            f"frechet_distance needs >= 2 samples per set to fit a covariance, got {x.shape[0]} and {y.shape[0]}"
        )
    mu_x, cov_x = _gaussian_fit(x)
    mu_y, cov_y = _gaussian_fit(y.to(x.device))
    root_x = _psd_sqrt(cov_x)
    product = root_x @ cov_y @ root_x
    product = 0.5 * (product + product.T)  # symmetric up to round-off; eigvalsh wants it exactly
    trace_covmean = torch.linalg.eigvalsh(product).clamp_min(0).sqrt().sum()
    fd = (mu_x - mu_y).pow(2).sum() + cov_x.trace() + cov_y.trace() - 2.0 * trace_covmean
    return max(float(fd), 0.0)


@autocast_off
def t2i_metrics(
    mapped_text: Tensor,
    image_emb: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    chunk_size: int = 1024,
    ties: TieRule = "pessimistic",
) -> dict[str, float]:
    """Distribution, pair and retrieval quality of text embeddings mapped into the image space.

    Args:
        mapped_text: (M, D) adapter outputs for M captions, in the image embedding space.
        image_emb: (N, D) real (frozen-encoder) image embeddings.
        text_to_image: (M,) image row of each caption; -1 marks a caption with no image (it still
            enters the Frechet distance, not the paired terms).
        ks: recall cut-offs of the text -> image retrieval.
        chunk_size: text queries per (chunk, N) score block.
        ties: tie rule of the recall, as in `retrieval_metrics`.

    Returns:
        {"frechet_distance": FD of the raw (unnormalised) features, which is what a decoder sees,
        "paired_cosine": mean cosine of each mapped text with its image, "t2i_R@1": ..., ...}
        with recall in percent.
    """
    check_features("mapped_text", mapped_text)
    check_features("image_emb", image_emb)
    check_same_dim("mapped_text", mapped_text, "image_emb", image_emb)
    ks = check_ks(ks)
    chunk_size = check_chunk_size(chunk_size)
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f'ties must be "pessimistic" or "optimistic", got {ties!r}')
    dtype = compute_dtype(mapped_text, image_emb)
    image = unit_rows(image_emb, dtype)
    text = unit_rows(mapped_text.to(image.device), dtype)
    t2i = check_index("text_to_image", text_to_image, text.shape[0], image.shape[0], device=image.device)
    paired = t2i >= 0
    if not bool(paired.any()):
        raise ValueError("text_to_image marks every mapped text as unpaired (-1); t2i_metrics needs pairs")
    out = {
        "frechet_distance": frechet_distance(mapped_text, image_emb),
        "paired_cosine": float((text[paired] * image[t2i[paired]]).sum(1).mean()),
    }
    ranks = text_query_ranks(text, image, t2i, chunk_size, ties)
    out.update({f"t2i_R@{k}": recall_at_k(ranks, k) for k in ks})
    return out
