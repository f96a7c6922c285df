"""Pure guidance math on tensors of layout ``(b, c, *spatial)`` (any rank).

No state, no configuration objects: strategies hold parameters and call these. Per-sample reductions
run over all non-batch dims; low-precision inputs are computed in float32 and cast back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import NonFiniteError, ShapeError
from .layout import non_batch_dims

__all__ = [
    "cfg",
    "check_finite",
    "check_pair",
    "per_sample_dot",
    "per_sample_norm",
    "upcast",
]


def upcast(x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``x`` in at least ``dtype`` precision (float64 stays float64)."""
    if x.dtype == torch.float64 or x.dtype == dtype:
        return x
    return x.to(dtype)


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


def check_finite(x: Tensor, name: str) -> None:
    """Raise :class:`NonFiniteError` naming ``name`` if ``x`` holds NaN or Inf."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteError(
            f"{name}: expected finite values, got {bad} NaN/Inf of {x.numel()} "
            "(pass allow_nonfinite=True to let non-finite values through)"
        )


def cfg(pred_cond: Tensor, pred_uncond: Tensor, scale: float | Tensor) -> Tensor:
    """Classifier-free guidance ``u + w (c - u)`` (Ho & Salimans 2022, eq. 6, Imagen convention).

    ``scale`` is a float or a tensor broadcastable to the predictions (a per-point map in SAMG).
    ``scale == 1`` gives ``pred_cond``; ``scale == 0`` gives ``pred_uncond``.
    """
    if pred_cond.dtype in (torch.float16, torch.bfloat16):
        out = torch.lerp(upcast(pred_uncond), upcast(pred_cond), scale if isinstance(scale, Tensor) else float(scale))
        return out.to(pred_cond.dtype)
    if isinstance(scale, Tensor):
        return torch.lerp(pred_uncond, pred_cond, scale.to(pred_cond.dtype))
    return torch.lerp(pred_uncond, pred_cond, float(scale))


def per_sample_dot(a: Tensor, b: Tensor) -> Tensor:
    """``<a, b>`` per sample over all non-batch dims, shape ``(b,)``."""
    return (a * b).sum(dim=non_batch_dims(a))


def per_sample_norm(x: Tensor) -> Tensor:
    """L2 norm per sample over all non-batch dims, shape ``(b,)``."""
    return torch.linalg.vector_norm(x, dim=non_batch_dims(x))
