"""Class-conditional fidelity under a classifier: accuracy and mean p(y | x) of the requested label."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ShapeError

__all__ = ["class_accuracy", "mean_class_probability"]


def _check(logits: Tensor, labels: Tensor) -> None:
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ShapeError(
            f"logits, labels: expected (n, classes) and (n,), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise ShapeError(f"labels: expected values in [0, {logits.shape[1] - 1}], got {labels.min()}..{labels.max()}")


def class_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Share of rows whose arg-max class is the requested label."""
    _check(logits, labels)
    return float((logits.argmax(1) == labels).double().mean())


def mean_class_probability(logits: Tensor, labels: Tensor) -> float:
    """Mean softmax probability of the requested label (a smooth, saturation-aware accuracy)."""
    _check(logits, labels)
    probs = torch.softmax(logits.to(torch.float64), dim=1)
    return float(probs.gather(1, labels[:, None]).mean())
