"""Evaluation: retrieval, zero/few-shot classification, modality-gap and T2I metrics, plots, reports.

Every metric is a pure function over embedding tensors returning plain floats. Recall and
accuracy are percentages (0-100, as in the paper's tables); distances, divergences and the
image-vs-text separability (0.5 = indistinguishable, 1.0 = separated) are raw values. Metrics ignore
an ambient `torch.autocast`: bfloat16 scores tie, and ties count against a query.
"""

from csaligner.eval.class_names import parse_class_renames, prompt_class_names
from csaligner.eval.classification import (
    CLIP_IMAGENET_TEMPLATES,
    DEFAULT_TEMPLATES,
    FLOWERS102_TEMPLATES,
    TEMPLATE_PRESETS,
    ZeroShotResult,
    class_embeddings,
    class_prompts,
    few_shot_accuracy,
    load_templates,
    zero_shot_accuracy,
)
from csaligner.eval.gap import linear_separability, mean_cross_distance, modality_gap_metrics, uniformity
from csaligner.eval.plots import plot_bars, plot_paired_distance_hist, plot_projection, plot_sensitivity, plot_tradeoff
from csaligner.eval.report import MeanStd, ReportSection, format_table, format_value, write_report
from csaligner.eval.retrieval import recall_at_k, retrieval_metrics
from csaligner.eval.t2i import frechet_distance, t2i_metrics

__all__ = [
    "CLIP_IMAGENET_TEMPLATES",
    "DEFAULT_TEMPLATES",
    "FLOWERS102_TEMPLATES",
    "TEMPLATE_PRESETS",
    "MeanStd",
    "ReportSection",
    "ZeroShotResult",
    "class_embeddings",
    "class_prompts",
    "few_shot_accuracy",
    "format_table",
    "format_value",
    "frechet_distance",
    "linear_separability",
    "load_templates",
    "mean_cross_distance",
    "modality_gap_metrics",
    "parse_class_renames",
    "plot_bars",
    "plot_paired_distance_hist",
    "plot_projection",
    "plot_sensitivity",
    "plot_tradeoff",
    "prompt_class_names",
    "recall_at_k",
    "retrieval_metrics",
    "t2i_metrics",
    "uniformity",
    "write_report",
    "zero_shot_accuracy",
]
