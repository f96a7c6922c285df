"""Sample-quality metrics: classifier fidelity, Fréchet distance, k-NN precision/recall, overshoot, cost.

Pure functions on tensors; :func:`sample_metrics` runs them all for one set of samples.
"""

from __future__ import annotations

from .classify import class_accuracy, mean_class_probability
from .cost import CallCounter
from .frechet import feature_stats, frechet_distance, frechet_distance_from_stats, per_class_frechet_distance
from .frontier import excess_over_frontier, frontier_at
from .knn import knn_precision_recall, knn_radii
from .pixels import overshoot
from .suite import FeatureClassifier, Reference, embed, sample_metrics

__all__ = [
    "CallCounter",
    "FeatureClassifier",
    "Reference",
    "class_accuracy",
    "embed",
    "excess_over_frontier",
    "feature_stats",
    "frechet_distance",
    "frechet_distance_from_stats",
    "frontier_at",
    "knn_precision_recall",
    "knn_radii",
    "mean_class_probability",
    "overshoot",
    "per_class_frechet_distance",
    "sample_metrics",
]
