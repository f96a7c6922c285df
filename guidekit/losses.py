"""Differentiable objectives on the predicted clean sample, for loss guidance (:class:`~guidekit.strategies.DPS`).

A *loss* is any callable ``loss(x0, ctx) -> (b,)``: one value per sample, differentiable in ``x0``
(canonical ``(b, c, *spatial)``, EDM data units). Shipped here:

* linear measurement operators ``A`` (:class:`Inpaint`, :class:`Downsample`, :class:`Blur`,
  :class:`Identity`) and :class:`MeasurementLoss` ``‖y − A(x0)‖`` for inverse problems (inpainting,
  super-resolution, deblurring, denoising), ``y`` measured as ``A(x) + noise``;
* :class:`ClassifierLoss` ``−log p(target | x0)`` for classifier guidance with any classifier module.

Losses hold data (the measurement, a mask, a classifier), so a strategy that carries one is built in code,
not from a JSON spec.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .context import GuidanceContext
from .errors import ConfigError, ShapeError
from .ops.checks import check_number

__all__ = [
    "Blur",
    "ClassifierLoss",
    "Downsample",
    "Identity",
    "Inpaint",
    "Loss",
    "MeasurementLoss",
    "check_loss_value",
    "sample_norm",
]

Loss = Callable[[Tensor, GuidanceContext], Tensor]
"""``loss(x0, ctx) -> (b,)``, differentiable in ``x0``."""


class Operator:
    """A linear measurement operator ``A`` on canonical ``(b, c, *spatial)`` samples."""

    def __call__(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Identity(Operator):
    """``A = I``: denoising (the measurement is the sample plus noise)."""

    def __call__(self, x: Tensor) -> Tensor:
        return x


@dataclass(frozen=True, eq=False)
class Inpaint(Operator):
    """``A(x) = mask ⊙ x``: keep the observed entries (``mask`` 1), zero the missing ones (0).

    ``mask`` broadcasts against the sample (``(1, 1, h, w)`` for one mask over channels and batch).
    """

    mask: Tensor = field(default_factory=lambda: torch.ones(1))

    def __post_init__(self) -> None:
        if not isinstance(self.mask, Tensor) or not bool(((self.mask == 0) | (self.mask == 1)).all()):
            raise ConfigError("mask: expected a tensor of 0 (missing) and 1 (observed) entries")

    def __call__(self, x: Tensor) -> Tensor:
        return x * self.mask.to(device=x.device, dtype=x.dtype)


@dataclass(frozen=True)
class Downsample(Operator):
    """``A`` = average pooling by ``factor`` over the last two dims (super-resolution by ``factor``)."""

    factor: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.factor, bool) or not isinstance(self.factor, int) or self.factor < 1:
            raise ConfigError(f"factor: expected an integer >= 1, got {self.factor!r}")

    def __call__(self, x: Tensor) -> Tensor:
        lead = x.shape[:-2]
        pooled = F.avg_pool2d(x.reshape(-1, 1, *x.shape[-2:]), self.factor)
        return pooled.reshape(*lead, *pooled.shape[-2:])


@dataclass(frozen=True)
class Blur(Operator):
    """``A`` = separable Gaussian blur of standard deviation ``sigma`` pixels (reflect padding)."""

    sigma: float = 1.0
    truncate: float = 3.0

    def __post_init__(self) -> None:
        check_number("sigma", self.sigma, low=1e-6)
        check_number("truncate", self.truncate, low=1.0)

    def __call__(self, x: Tensor) -> Tensor:
        radius = max(1, int(self.truncate * self.sigma + 0.5))
        t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
        k = torch.exp(-0.5 * (t / self.sigma) ** 2)
        k = k / k.sum()
        lead, (h, w) = x.shape[:-2], x.shape[-2:]
        y = x.reshape(-1, 1, h, w)
        y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
        y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
        return y.reshape(*lead, h, w)


@dataclass(frozen=True, eq=False)
class MeasurementLoss:
    """``‖y − A(x0)‖₂`` per sample: the residual norm of a linear inverse problem (DPS's objective).

    Args:
        operator: ``A``.
        measurement: ``y = A(x) + noise``, shaped like ``A(x0)`` (a batch-1 measurement is shared).
    """

    operator: Operator
    measurement: Tensor

    def __post_init__(self) -> None:
        if not callable(self.operator):
            raise ConfigError(f"operator: expected a measurement operator, got {type(self.operator).__name__}")
        if not isinstance(self.measurement, Tensor):
            raise ConfigError(f"measurement: expected a tensor, got {type(self.measurement).__name__}")

    def __call__(self, x0: Tensor, ctx: GuidanceContext) -> Tensor:
        predicted = self.operator(x0)
        y = self.measurement.to(device=predicted.device, dtype=predicted.dtype)
        if y.shape[1:] != predicted.shape[1:] or y.shape[0] not in (1, predicted.shape[0]):
            raise ShapeError(
                f"measurement: expected the shape of A(x0) {tuple(predicted.shape)} (or batch 1), got {tuple(y.shape)}"
            )
        return (y - predicted).flatten(1).norm(dim=1)


@dataclass(frozen=True, eq=False)
class ClassifierLoss:
    """``−log p(target | x0)`` from a classifier ``logits = classifier(x0)`` (classifier guidance on x0).

    Args:
        classifier: a module or callable mapping the canonical sample to ``(b, classes)`` logits.
        target: the class per sample ``(b,)`` or one class for all.
    """

    classifier: Any
    target: Tensor | int = 0

    def __call__(self, x0: Tensor, ctx: GuidanceContext) -> Tensor:
        logits = self.classifier(x0)
        if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != x0.shape[0]:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ShapeError(f"classifier: expected (b, classes) logits for b = {x0.shape[0]}, got {got}")
        target = torch.as_tensor(self.target, device=logits.device).expand(x0.shape[0])
        return F.cross_entropy(logits, target, reduction="none")


def sample_norm(x0: Tensor, ctx: GuidanceContext) -> Tensor:
    """``‖x0‖₂`` per sample: a data-free loss that pulls samples towards 0 (examples and the contract)."""
    return x0.flatten(1).norm(dim=1)


def check_loss_value(value: object, batch: int, name: str = "loss") -> Tensor:
    """The loss's value, refused unless it is a ``(b,)`` tensor that carries a gradient."""
    if not isinstance(value, Tensor) or value.shape != (batch,):
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ShapeError(f"{name}: expected one value per sample, shape ({batch},), got {got}")
    if not value.requires_grad:
        raise ConfigError(
            f"{name}: expected a value differentiable in x0, got one without a gradient (a detached or "
            "non-differentiable loss)"
        )
    return value
