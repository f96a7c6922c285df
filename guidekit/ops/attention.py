"""Attention-space formulas of perturbation guidance (SEG's query blur)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError

__all__ = ["INFINITE_BLUR", "blur_queries"]

INFINITE_BLUR = 9999.0
"""A query blur sigma at or above this is the infinite blur (the official SEG threshold)."""


def blur_queries(query: Tensor, sigma: float, token_dim: int = 1) -> Tensor:
    """SEG's blur of ``query`` ``(b, n, d)`` (tokens along ``token_dim``): the mean over tokens for an
    infinite ``sigma``, else a separable Gaussian over the square ``sqrt(n) x sqrt(n)`` token grid."""
    if sigma >= INFINITE_BLUR:
        return query.mean(dim=token_dim, keepdim=True).expand_as(query)
    q = query.movedim(token_dim, 1)
    b, n, d = q.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ConfigError(
            f"sigma: a finite query blur needs a square token grid, got {n} tokens (use an infinite blur)"
        )
    size = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    size = min(size, side - (side % 2 - 1))
    t = torch.arange(size, dtype=q.dtype, device=q.device) - (size - 1) / 2
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    grid = q.permute(0, 2, 1).reshape(b * d, 1, side, side)
    pad = size // 2
    grid = F.conv2d(F.pad(grid, (pad, pad, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    grid = F.conv2d(F.pad(grid, (0, 0, pad, pad), mode="reflect"), k.view(1, 1, -1, 1))
    return grid.reshape(b, d, n).permute(0, 2, 1).movedim(1, token_dim)
