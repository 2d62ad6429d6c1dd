"""Evaluation: retrieval, zero/few-shot classification, modality-gap and T2I metrics, plots, reports.

Every metric is a pure function over embedding tensors returning plain floats. Recall and
accuracy are percentages (0-100, as in the paper's tables); distances, divergences and the
image-vs-text separability (0.5 = indistinguishable, 1.0 = separated) are raw values.
"""

from csaligner.eval.retrieval import recall_at_k, retrieval_metrics

__all__ = ["recall_at_k", "retrieval_metrics"]
