"""Plain double-loop references, written for clarity, not speed (float64)."""

from __future__ import annotations

import math

from torch import Tensor


def kernel(a: Tensor, b: Tensor, sigma: float) -> float:
    return math.exp(-float(((a - b) ** 2).sum()) / (2 * sigma**2))


def mean_kernel(a: Tensor, b: Tensor, sigma: float) -> float:
    total = 0.0
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            total += kernel(a[i], b[j], sigma)
    return total / (a.shape[0] * b.shape[0])


def cs_loop(x: Tensor, y: Tensor, sigma: float) -> float:
    return (
        math.log(mean_kernel(x, x, sigma)) + math.log(mean_kernel(y, y, sigma)) - 2 * math.log(mean_kernel(x, y, sigma))
    )


def mmd_loop(x: Tensor, y: Tensor, sigma: float) -> float:
    return mean_kernel(x, x, sigma) + mean_kernel(y, y, sigma) - 2 * mean_kernel(x, y, sigma)


def info_nce_loop(x: Tensor, y: Tensor, tau: float, text_to_image: list[int] | None = None) -> float:
    x = x / x.norm(dim=1, keepdim=True)
    y = y / y.norm(dim=1, keepdim=True)
    t2i = list(range(x.shape[0])) if text_to_image is None else text_to_image
    s = [[float(x[i] @ y[j]) / tau for j in range(y.shape[0])] for i in range(x.shape[0])]
    t2i_terms = []
    for j in range(y.shape[0]):
        denom = sum(math.exp(s[i][j]) for i in range(x.shape[0]))
        t2i_terms.append(-math.log(math.exp(s[t2i[j]][j]) / denom))
    i2t_terms = []
    for i in range(x.shape[0]):
        denom = sum(math.exp(s[i][j]) for j in range(y.shape[0]))
        pos = [j for j in range(y.shape[0]) if t2i[j] == i]
        i2t_terms.append(sum(-math.log(math.exp(s[i][j]) / denom) for j in pos) / len(pos))
    return 0.5 * (sum(t2i_terms) / len(t2i_terms) + sum(i2t_terms) / len(i2t_terms))
