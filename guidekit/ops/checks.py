"""Validation: numbers, choices, finite tensors and prediction pairs, each check written once.

Every error names the argument, what was expected and what was received (``guidekit.errors``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ConfigError, NonFiniteError, ShapeError

__all__ = ["all_finite", "check_choice", "check_finite", "check_number", "check_pair", "is_finite_number", "is_number"]


def is_number(value: object) -> bool:
    """``value`` is an ``int`` or ``float`` and not a ``bool`` (``True`` is not a scale)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """:func:`is_number` and finite (no NaN, no Inf)."""
    return is_number(value) and math.isfinite(value)  # type: ignore[arg-type]


def check_number(name: str, value: object, *, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a float, or :class:`ConfigError` naming ``name`` if it is not a finite number in range."""
    if not is_finite_number(value):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    if low is not None and value < low:  # type: ignore[operator]
        raise ConfigError(f"{name}: expected a number >= {low}, got {value!r}")
    if high is not None and value > high:  # type: ignore[operator]
        raise ConfigError(f"{name}: expected a number <= {high}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """:class:`ConfigError` naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


def all_finite(x: Tensor) -> bool:
    """Whether ``x`` holds no NaN/Inf: one sum read back as a Python float first (any NaN/Inf makes it
    non-finite; float32 and float64 sum in their own dtype, half precisions in float32 so that finite values
    cannot overflow), and the exact element-wise test only when the sum is not finite (a finite tensor whose
    sum overflows), so the fast path has no false alarms."""
    total = x.sum() if x.dtype in (torch.float32, torch.float64) else x.sum(dtype=torch.float32)
    return math.isfinite(total.item()) or bool(torch.isfinite(x).all())


def check_finite(x: Tensor, name: str) -> None:
    """Raise :class:`NonFiniteError` naming ``name`` if ``x`` holds NaN or Inf (fast test: :func:`all_finite`)."""
    if not all_finite(x):
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteError(
            f"{name}: expected finite values, got {bad} NaN/Inf of {x.numel()} "
            "(pass allow_nonfinite=True to let non-finite values through)"
        )


def check_pair(pred_cond: Tensor, pred_uncond: Tensor) -> None:
    """Raise :class:`ShapeError` unless the two predictions share shape, dtype and device (and ndim >= 2)."""
    if not isinstance(pred_cond, Tensor) or not isinstance(pred_uncond, Tensor):
        raise ShapeError(
            f"pred_cond, pred_uncond: expected tensors, got {type(pred_cond).__name__} and {type(pred_uncond).__name__}"
        )
    if pred_cond.shape != pred_uncond.shape:
        raise ShapeError(
            f"pred_uncond: expected the shape of pred_cond {tuple(pred_cond.shape)}, got {tuple(pred_uncond.shape)}"
        )
    if pred_cond.ndim < 2:
        raise ShapeError(f"pred_cond: expected (b, c, *spatial) with at least 2 dims, got {tuple(pred_cond.shape)}")
    if pred_cond.dtype != pred_uncond.dtype:
        raise ShapeError(f"pred_uncond: expected dtype {pred_cond.dtype} like pred_cond, got {pred_uncond.dtype}")
    if pred_cond.device != pred_uncond.device:
        raise ShapeError(f"pred_uncond: expected device {pred_cond.device} like pred_cond, got {pred_uncond.device}")
