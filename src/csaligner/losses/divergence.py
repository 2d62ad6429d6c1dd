"""Distribution divergences between two feature clouds: Cauchy-Schwarz, MMD and Gaussian KL.

All kernel quantities are computed in the log domain: log mean_ij k(a_i, b_j) is a logsumexp of
-||a_i - b_j||^2 / (2 sigma^2), so tiny bandwidths and far-apart clouds stay finite (no log(0)).
These are the dense references: they hold (M, N) matrices. The O(N)-memory path lives in
`csaligner.kernels` and is tested against these functions. Like it, they ignore an ambient
`torch.autocast`: a bfloat16 ||a - b||^2 loses the CS divergence (`csaligner._autocast`).
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from torch import Tensor

from csaligner._autocast import autocast_off
from csaligner._validation import (
    check_features,
    check_positive,
    check_same_dim,
    check_tokens,
    check_weights,
    checks_finite_once,
    is_integer,
)

Bandwidth = float | Tensor | Literal["median"]


def _compute_dtype(*xs: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances, (..., M, D) x (..., N, D) -> (..., M, N), clamped at 0."""
    a2 = (a * a).sum(-1)
    b2 = (b * b).sum(-1)
    d2 = a2.unsqueeze(-1) + b2.unsqueeze(-2) - 2.0 * (a @ b.transpose(-1, -2))
    return d2.clamp_min(0.0)


@autocast_off
def median_bandwidth(x: Tensor, y: Tensor, max_samples: int = 2048) -> Tensor:
    """Median heuristic: sigma = median pairwise distance of the pooled samples (detached).

    At most `max_samples` points (an even subsample) enter the median, so the cost stays bounded.

    Args:
        x: (M, D) samples.
        y: (N, D) samples.
        max_samples: most pooled points that enter the median, >= 2.

    Returns:
        0-dim tensor (float32, or float64 for float64 inputs); 1.0 when every pooled point coincides.
    """
    check_features("x", x)
    check_features("y", y)
    check_same_dim("x", x, "y", y)
    if not is_integer(max_samples) or max_samples < 2:
        raise ValueError(f"max_samples must be an integer >= 2 (points entering the median), got {max_samples!r}")
    pooled = torch.cat([x, y]).detach().to(_compute_dtype(x, y))
    if pooled.shape[0] > max_samples:
        idx = torch.linspace(0, pooled.shape[0] - 1, max_samples, device=pooled.device).long()
        pooled = pooled[idx]
    d2 = squared_distances(pooled, pooled)
    iu = torch.triu_indices(d2.shape[0], d2.shape[0], offset=1, device=d2.device)
    dist = d2[iu[0], iu[1]].sqrt()
    if dist.numel() == 0 or float(dist.median()) <= 0:
        return torch.ones((), dtype=pooled.dtype, device=pooled.device)
    return dist.median()


def resolve_bandwidth(sigma: Bandwidth, x: Tensor, y: Tensor) -> float | Tensor:
    """Turn `sigma` (number, tensor or "median") into a positive bandwidth."""
    if isinstance(sigma, str):
        if sigma != "median":
            raise ValueError(f'sigma must be a positive number or "median", got {sigma!r}')
        return median_bandwidth(x, y)
    check_positive("sigma", sigma)
    return sigma


def log_mean_kernel(
    a: Tensor, b: Tensor, sigma: float | Tensor, wa: Tensor | None = None, wb: Tensor | None = None
) -> Tensor:
    """log( sum_ij wa_i wb_j k(a_i, b_j) ) with weights normalised to sum 1 (plain mean when None).

    Args:
        a: (M, D) features.
        b: (N, D) features.
        sigma: Gaussian kernel bandwidth.
        wa: optional (M,) non-negative weights or mask.
        wb: optional (N,) non-negative weights or mask.

    Returns:
        Scalar tensor.
    """
    if isinstance(sigma, Tensor):  # a learned float32 sigma squared in float32 would round float64 logits
        sigma = sigma.to(a.dtype)
    logits = squared_distances(a, b) / (-2.0 * sigma * sigma)  # (M, N) log k(a_i, b_j)
    if wa is None and wb is None:
        return torch.logsumexp(logits.flatten(), 0) - math.log(a.shape[0] * b.shape[0])
    logits = logits + _log_normalised(wa, a).unsqueeze(1) + _log_normalised(wb, b).unsqueeze(0)
    return torch.logsumexp(logits.flatten(), 0)


def _log_normalised(w: Tensor | None, ref: Tensor) -> Tensor:
    """(n,) log of weights normalised to sum 1 (uniform when None); log(0) = -inf drops a sample."""
    if w is None:
        return torch.full((ref.shape[0],), -math.log(ref.shape[0]), dtype=ref.dtype, device=ref.device)
    return (w / w.sum()).log()


def _prepare(x: Tensor, y: Tensor, sigma: Bandwidth) -> tuple[Tensor, Tensor, float | Tensor]:
    check_features("x", x)
    check_features("y", y)
    check_same_dim("x", x, "y", y)
    dtype = _compute_dtype(x, y)
    x, y = x.to(dtype), y.to(dtype)
    bw = resolve_bandwidth(sigma, x, y)
    # Gaussian-kernel divergences are translation invariant; centring on the pooled mean keeps
    # ||a||^2 + ||b||^2 - 2ab accurate in float32 when features sit far from the origin.
    center = torch.cat([x, y]).mean(0).detach()
    return x - center, y - center, bw


@autocast_off
@checks_finite_once
def cs_divergence(
    x: Tensor,
    y: Tensor,
    sigma: Bandwidth = 1.0,
    x_weights: Tensor | None = None,
    y_weights: Tensor | None = None,
) -> Tensor:
    """Empirical Cauchy-Schwarz divergence between the samples x and y (Gaussian kernel KDE).

    D_CS = log mean k(x_i,x_j) + log mean k(y_i,y_j) - 2 log mean k(x_i,y_j), k(a,b) =
    exp(-||a-b||^2 / (2 sigma^2)), on the features exactly as given (no normalisation).

    Args:
        x: (M, D) samples of the first distribution.
        y: (N, D) samples of the second; M != N is allowed (no pairing is used).
        sigma: kernel bandwidth > 0, or "median" for the median heuristic.
        x_weights: optional (M,) weights or boolean mask (a mask of False drops the sample).
        y_weights: optional (N,) weights or boolean mask.

    Returns:
        Scalar tensor >= 0 (float32, or float64 for float64 inputs); 0 iff the KDEs coincide.
    """
    x, y, bw = _prepare(x, y, sigma)
    wx = check_weights("x_weights", x_weights, x.shape[0], x)
    wy = check_weights("y_weights", y_weights, y.shape[0], y)
    if wx is not None:
        wx = wx.to(x.dtype)
    if wy is not None:
        wy = wy.to(y.dtype)
    lxx = log_mean_kernel(x, x, bw, wx, wx)
    lyy = log_mean_kernel(y, y, bw, wy, wy)
    lxy = log_mean_kernel(x, y, bw, wx, wy)
    return lxx + lyy - 2.0 * lxy


@autocast_off
def token_cs_divergence(
    x_tokens: Tensor,
    y_tokens: Tensor,
    x_mask: Tensor | None = None,
    y_mask: Tensor | None = None,
    sigma: Bandwidth = 1.0,
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """Token-level CS divergence: per sample, all vision tokens vs all text tokens (batched).

    Args:
        x_tokens: (B, V, D) vision tokens.
        y_tokens: (B, L, D) text tokens.
        x_mask: optional (B, V) bool (or 0/1), True for real tokens. Padding is ignored whatever it
            holds, even NaN: only real tokens must be finite, and padding gets zero gradient.
        y_mask: optional (B, L) bool (or 0/1).
        sigma: bandwidth > 0 or "median" (one bandwidth for the whole batch).
        reduction: "mean" over the batch, or "none" for the (B,) per-sample values.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f'reduction must be "mean" or "none" (per-sample values), got {reduction!r}')
    mx = check_tokens("x_tokens", x_tokens, "x_mask", x_mask)
    my = check_tokens("y_tokens", y_tokens, "y_mask", y_mask)
    check_same_dim("x_tokens", x_tokens, "y_tokens", y_tokens)
    if x_tokens.shape[0] != y_tokens.shape[0]:
        raise ValueError(
            f"x_tokens and y_tokens must hold the same samples: batch sizes {x_tokens.shape[0]} and "
            f"{y_tokens.shape[0]} differ"
        )
    dtype = _compute_dtype(x_tokens, y_tokens)
    # Padding zeroed first (where, not a product): 0 * NaN would poison the masked sums and matmuls.
    x = x_tokens.to(dtype).masked_fill(~mx.unsqueeze(-1), 0.0)  # (B, V, D)
    y = y_tokens.to(dtype).masked_fill(~my.unsqueeze(-1), 0.0)  # (B, L, D)
    bw = resolve_bandwidth(sigma, x[mx], y[my]) if isinstance(sigma, str) else sigma
    check_positive("sigma", bw)
    if isinstance(bw, Tensor):  # squared in the compute dtype, as in log_mean_kernel
        bw = bw.to(dtype)
    # Centre each sample on its own token mean (translation invariance, float32 accuracy).
    n_x, n_y = mx.sum(1, keepdim=True), my.sum(1, keepdim=True)  # (B, 1)
    center = ((x * mx.unsqueeze(-1)).sum(1) + (y * my.unsqueeze(-1)).sum(1)) / (n_x + n_y)
    x, y = x - center.detach().unsqueeze(1), y - center.detach().unsqueeze(1)

    def lmk(a: Tensor, b: Tensor, ma: Tensor, mb: Tensor) -> Tensor:
        logits = squared_distances(a, b) / (-2.0 * bw * bw)  # (B, Ta, Tb)
        logits = logits.masked_fill(~(ma.unsqueeze(2) & mb.unsqueeze(1)), float("-inf"))
        counts = (ma.sum(1) * mb.sum(1)).to(dtype)
        return torch.logsumexp(logits.flatten(1), 1) - counts.log()

    per_sample = lmk(x, x, mx, mx) + lmk(y, y, my, my) - 2.0 * lmk(x, y, mx, my)  # (B,)
    return per_sample.mean() if reduction == "mean" else per_sample


@autocast_off
def mmd(x: Tensor, y: Tensor, sigma: Bandwidth = 1.0) -> Tensor:
    """Squared Gaussian-kernel MMD (biased V-statistic): mean k_xx + mean k_yy - 2 mean k_xy.

    Args:
        x: (M, D) samples; y: (N, D) samples; sigma: bandwidth > 0 or "median".
    """
    x, y, bw = _prepare(x, y, sigma)
    return log_mean_kernel(x, x, bw).exp() + log_mean_kernel(y, y, bw).exp() - 2.0 * log_mean_kernel(x, y, bw).exp()


_WARNED_RANK_DEFICIENT = False
"""gaussian_kl warns once per process when a sample covariance is rank-deficient (a loss calls it every step)."""


@autocast_off
def gaussian_kl(x: Tensor, y: Tensor, ridge: float = 1e-3, symmetric: bool = False) -> Tensor:
    """KL(N(mu_x, S_x) || N(mu_y, S_y)) between Gaussians fitted to x (M, D) and y (N, D).

    A ridge `ridge * I` keeps covariances invertible when D exceeds the batch size. Computed in
    float64 with Cholesky factors. `symmetric=True` returns the mean of both directions.

    With M or N <= D the sample covariance has rank below D: the ridge alone fills the missing
    directions, and their log-determinant terms (of order D * log(variance / ridge)) dominate the
    value, which then says more about N, D and the ridge than about the two distributions. That case
    warns once per process; use more samples than dimensions (or fewer dimensions).
    """
    check_features("x", x)
    check_features("y", y)
    check_same_dim("x", x, "y", y)
    check_positive("ridge", ridge)
    _warn_rank_deficient(min(x.shape[0], y.shape[0]), x.shape[1], ridge)
    out_dtype = _compute_dtype(x, y)
    x64, y64 = x.double(), y.double()

    def fit(a: Tensor) -> tuple[Tensor, Tensor]:
        mu = a.mean(0)
        c = a - mu
        cov = c.T @ c / max(a.shape[0] - 1, 1)
        return mu, cov + ridge * torch.eye(a.shape[1], dtype=a.dtype, device=a.device)

    (mx, sx), (my, sy) = fit(x64), fit(y64)

    def kl(m0: Tensor, s0: Tensor, m1: Tensor, s1: Tensor) -> Tensor:
        l1 = torch.linalg.cholesky(s1)
        l0 = torch.linalg.cholesky(s0)
        trace = torch.cholesky_solve(s0, l1).diagonal().sum()
        diff = (m1 - m0).unsqueeze(1)
        maha = (diff * torch.cholesky_solve(diff, l1)).sum()
        logdet = 2.0 * (l1.diagonal().log().sum() - l0.diagonal().log().sum())
        return 0.5 * (trace + maha - m0.shape[0] + logdet)

    out = kl(mx, sx, my, sy)
    if symmetric:
        out = 0.5 * (out + kl(my, sy, mx, sx))
    return out.to(out_dtype)


def _warn_rank_deficient(n: int, dim: int, ridge: float) -> None:
    global _WARNED_RANK_DEFICIENT
    if n > dim or _WARNED_RANK_DEFICIENT:
        return
    _WARNED_RANK_DEFICIENT = True
    warnings.warn(
        f"gaussian_kl: {n} samples in {dim} dimensions (N <= D) give a rank-deficient covariance, so the ridge "
        f"({ridge:g} * I) fills at least {dim - n + 1} of its {dim} directions and dominates the KL value; use more "
        "samples than dimensions (in `csalign train`, train.batch_size > model.out_dim, or a smaller model.out_dim), "
        "or a divergence without a covariance (cs_aligner, mmd). Warned once per process",
        stacklevel=3,
    )
