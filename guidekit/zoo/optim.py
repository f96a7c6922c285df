"""What the embedded models' training loops share: the EMA of the weights and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ema_update", "warmup_cosine"]


def ema_update(ema: nn.Module, model: nn.Module, step: int, decay: float) -> None:
    """``ema <- lerp(ema, model, 1 - d)`` with the decay warmed up as ``d = min(decay, (1 + step) / (10 + step))``."""
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1.0 - d)


def warmup_cosine(step: int, steps: int, peak: float, warmup: int, floor: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``floor * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))
