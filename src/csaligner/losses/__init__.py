"""Loss functions: contrastive (InfoNCE), divergences (CS, MMD, KL), and training objectives."""

from csaligner.losses.contrastive import info_nce
from csaligner.losses.divergence import (
    cs_divergence,
    gaussian_kl,
    log_mean_kernel,
    median_bandwidth,
    mmd,
    token_cs_divergence,
)
from csaligner.losses.objective import OBJECTIVES, AlignmentLoss, CSAlignerLoss, LossConfig, build_objective

__all__ = [
    "OBJECTIVES",
    "AlignmentLoss",
    "CSAlignerLoss",
    "LossConfig",
    "build_objective",
    "cs_divergence",
    "gaussian_kl",
    "info_nce",
    "log_mean_kernel",
    "median_bandwidth",
    "mmd",
    "token_cs_divergence",
]
