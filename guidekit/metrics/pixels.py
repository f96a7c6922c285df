"""Pixel-range statistics of raw samples (before any clamp): how far guidance pushes past the data range."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = ["overshoot"]


def overshoot(samples: Tensor, threshold: float = 1.1, limit: float = 1.0) -> tuple[float, float]:
    """``(share of values with |x| > threshold, mean of max(|x| - limit, 0))`` over every value.

    Data live in ``[-limit, limit]``. Use it on samples *before* clamping. The threshold sits above the
    limit on purpose: about half of the digits' pixels are background at exactly -1, so ``|x| > 1`` mostly
    counts tiny background excursions rather than saturation.
    """
    if threshold < limit:
        raise ConfigError(f"threshold: expected a value >= limit ({limit}), got {threshold}")
    mag = samples.detach().to(torch.float64).abs()
    return float((mag > threshold).double().mean()), float((mag - limit).clamp(min=0).mean())
