"""csaligner: distributional vision-language alignment with the Cauchy-Schwarz divergence."""

from csaligner.adapters import (
    AdapterConfig,
    LinearAdapter,
    MLPAdapter,
    PriorTransformerAdapter,
    build_adapter,
    load_adapter,
    save_adapter,
)
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
    "AdapterConfig",
    "AlignmentLoss",
    "CSAlignerLoss",
    "LinearAdapter",
    "LossConfig",
    "MLPAdapter",
    "PriorTransformerAdapter",
    "__version__",
    "build_adapter",
    "build_objective",
    "cs_divergence",
    "gaussian_kl",
    "info_nce",
    "load_adapter",
    "median_bandwidth",
    "mmd",
    "save_adapter",
    "token_cs_divergence",
]
