"""All sample metrics of one run in one call, against real reference sets."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import torch
from torch import Tensor

from ..errors import ShapeError
from .classify import class_accuracy, mean_class_probability
from .frechet import feature_stats, frechet_distance_from_stats, per_class_frechet_distance
from .knn import knn_precision_recall, knn_radii
from .pixels import overshoot

__all__ = ["FeatureClassifier", "Reference", "embed", "sample_metrics"]


class FeatureClassifier(Protocol):
    """An evaluation network: ``features_and_logits(x) -> ((n, d) features, (n, classes) logits)``."""

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class Reference:
    """Features ``(n, d)`` and labels ``(n,)`` of a real split, embedded once with :func:`embed`.

    Its Gaussian statistics and k-NN radii are computed on first use and kept, so comparing many sample
    sets against one reference costs one pass over the reference.
    """

    features: Tensor
    labels: Tensor

    @cached_property
    def stats(self) -> tuple[Tensor, Tensor]:
        """Mean and covariance of the features (:func:`feature_stats`)."""
        return feature_stats(self.features)

    def radii(self, k: int) -> Tensor:
        """k-NN radii of the features (:func:`knn_radii`), cached per ``k``."""
        cache = self.__dict__.setdefault("_radii", {})
        if k not in cache:
            cache[k] = knn_radii(self.features.to(torch.float64), k)
        return cache[k]


def embed(classifier: FeatureClassifier, images: Tensor, batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    """``(features, logits)`` of ``images``, batched, without gradients."""
    feats, logits = [], []
    with torch.no_grad():
        for chunk in images.split(batch_size):
            f, lg = classifier.features_and_logits(chunk)
            feats.append(f)
            logits.append(lg)
    return torch.cat(feats), torch.cat(logits)


def sample_metrics(
    samples: Tensor,
    labels: Tensor,
    classifier: FeatureClassifier,
    references: dict[str, Reference],
    *,
    per_class_reference: str = "train",
    knn_reference: str = "train",
    k: int = 3,
) -> dict[str, float]:
    """Metrics of raw ``samples`` (before any clamp) generated for class ``labels``.

    Returns ``acc`` and ``p_y`` (classifier accuracy and mean p(y|x) of the requested label), ``fd_<ref>``
    for every reference, ``cfd`` (mean per-class FD against ``per_class_reference``), ``precision`` and
    ``recall`` (k-NN, against ``knn_reference``), ``over_share`` (share of |x| > 1.1) and ``over_mean``
    (mean excess beyond 1). The classifier sees the samples clamped to ``[-1, 1]``, like a saved image.
    """
    if labels.ndim != 1 or labels.shape[0] != samples.shape[0]:
        raise ShapeError(f"labels: expected ({samples.shape[0]},), one per sample, got {tuple(labels.shape)}")
    for name in (per_class_reference, knn_reference):
        if name not in references:
            raise ShapeError(f"references: expected a reference named {name!r}, got {sorted(references)}")
    share, mean_excess = overshoot(samples)
    feats, logits = embed(classifier, samples.clamp(-1.0, 1.0))
    out = {"acc": class_accuracy(logits, labels), "p_y": mean_class_probability(logits, labels)}
    own = feature_stats(feats)
    for name, ref in references.items():
        out[f"fd_{name}"] = frechet_distance_from_stats(*own, *ref.stats)
    ref = references[per_class_reference]
    per_class = per_class_frechet_distance(feats, labels, ref.features, ref.labels)
    out["cfd"] = sum(per_class.values()) / len(per_class) if per_class else float("nan")
    knn_ref = references[knn_reference]
    out["precision"], out["recall"] = knn_precision_recall(knn_ref.features, feats, k=k, real_radii=knn_ref.radii(k))
    out["over_share"], out["over_mean"] = share, mean_excess
    return out
