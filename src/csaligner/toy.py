"""Toy problems: the paper's Appendix B (high MI, large KL) and two synthetic modalities with a gap.

Appendix B makes the paper's point in closed form: two jointly Gaussian variables can share a lot
of information (InfoNCE is happy) while their marginal distributions stay far apart (a modality
gap that only a distribution-level term such as D_CS sees).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def bivariate_gaussian_mi(rho: float) -> float:
    """Mutual information (nats) of a bivariate Gaussian with correlation rho: -1/2 log(1 - rho^2)."""
    if not -1.0 < rho < 1.0:
        raise ValueError(f"rho must lie strictly between -1 and 1, got {rho}")
    return -0.5 * math.log(1.0 - rho * rho)


def gaussian_kl_1d(mean_p: float, var_p: float, mean_q: float, var_q: float) -> float:
    """KL(N(mean_p, var_p) || N(mean_q, var_q)) in nats."""
    if var_p <= 0 or var_q <= 0:
        raise ValueError(f"variances must be > 0, got var_p={var_p}, var_q={var_q}")
    return 0.5 * math.log(var_q / var_p) + (var_p + (mean_p - mean_q) ** 2) / (2.0 * var_q) - 0.5


@dataclass(frozen=True)
class MIvsKL:
    """The numbers of the Appendix B example."""

    rho: float
    mutual_information: float
    kl_x_to_y: float
    mean_x: float
    var_x: float
    mean_y: float
    var_y: float


def appendix_b_example(
    rho: float = 0.99, mean_x: float = 0.0, var_x: float = 3.0, mean_y: float = 3.0, var_y: float = 0.75
) -> MIvsKL:
    """MI vs KL for a jointly Gaussian (x, y): I(x; y) depends only on rho, KL(p(x) || p(y)) only on
    the marginals, so one can be large while the other is large too.

    The paper reports I = 1.959 for rho = 0.99 and KL ~ 6.81. Its exact marginal parameters for
    Fig. 2 were not available to us; the defaults here (means 0 and 3, variances 3 and 0.75) are
    our reconstruction that reproduces KL = 6.807 and are documented as such.
    """
    return MIvsKL(
        rho=rho,
        mutual_information=bivariate_gaussian_mi(rho),
        kl_x_to_y=gaussian_kl_1d(mean_x, var_x, mean_y, var_y),
        mean_x=mean_x,
        var_x=var_x,
        mean_y=mean_y,
        var_y=var_y,
    )


def sample_appendix_b(example: MIvsKL, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Draw n samples of (x, y) from the joint Gaussian of `example` (for plots and checks)."""
    g = torch.Generator().manual_seed(seed)
    sx, sy = math.sqrt(example.var_x), math.sqrt(example.var_y)
    cov = torch.tensor([[sx * sx, example.rho * sx * sy], [example.rho * sx * sy, sy * sy]], dtype=torch.float64)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    return z[:, 0] + example.mean_x, z[:, 1] + example.mean_y


def two_modalities_with_gap(
    n: int = 2000, dim: int = 32, latent_dim: int = 8, n_clusters: int = 10, gap: float = 1.5, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Paired synthetic "image" and "text" features sharing a latent, with a built-in modality gap.

    A clustered latent z (n, latent_dim) is mapped to each modality by its own random linear map
    plus noise; the text side also gets a constant offset of norm `gap`, so pairs carry the same
    information but the two clouds sit apart (like CLIP's cone effect).

    Returns:
        images (n, dim), texts (n, dim), cluster labels (n,).
    """
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_clusters, latent_dim, generator=g) * 2.0
    labels = torch.randint(0, n_clusters, (n,), generator=g)
    z = centers[labels] + 0.5 * torch.randn(n, latent_dim, generator=g)
    map_img = torch.randn(latent_dim, dim, generator=g) / math.sqrt(latent_dim)
    map_txt = torch.randn(latent_dim, dim, generator=g) / math.sqrt(latent_dim)
    offset = torch.randn(dim, generator=g)
    offset = gap * offset / offset.norm() * math.sqrt(dim)
    images = z @ map_img + 0.1 * torch.randn(n, dim, generator=g)
    texts = z @ map_txt + offset + 0.1 * torch.randn(n, dim, generator=g)
    return images, texts, labels
