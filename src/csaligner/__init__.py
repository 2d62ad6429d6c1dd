"""csaligner: distributional vision-language alignment with the Cauchy-Schwarz divergence."""

from csaligner.losses import (
    OBJECTIVES,
    AlignmentLoss,
    CSAlignerLoss,
    LossConfig,
    build_objective,
    cs_divergence,
    gaussian_kl,
    info_nce,
    median_bandwidth,
    mmd,
    token_cs_divergence,
)

__version__ = "0.1.0"

__all__ = [
    "OBJECTIVES",
    "AlignmentLoss",
    "CSAlignerLoss",
    "LossConfig",
    "__version__",
    "build_objective",
    "cs_divergence",
    "gaussian_kl",
    "info_nce",
    "median_bandwidth",
    "mmd",
    "token_cs_divergence",
]
