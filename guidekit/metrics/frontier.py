"""Comparing a strategy with a reference trade-off curve (the CFG frontier) at matched fidelity."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import ShapeError

__all__ = ["excess_over_frontier", "frontier_at"]


def frontier_at(fidelity: Sequence[float], quality: Sequence[float], target: float) -> float:
    """The frontier's ``quality`` where its ``fidelity`` reaches ``target``, by linear interpolation.

    The frontier is a sweep ordered by strength (e.g. CFG scales ascending): ``fidelity[i]`` and
    ``quality[i]`` at strength ``i``. The first segment whose fidelity range contains ``target`` is used,
    so small non-monotone wiggles of a noisy sweep do not matter. ``nan`` when ``target`` lies outside
    the sweep's fidelity range (no extrapolation).
    """
    if len(fidelity) != len(quality) or len(fidelity) < 1:
        raise ShapeError(
            f"fidelity, quality: expected two equally long non-empty sequences, got {len(fidelity)} and {len(quality)}"
        )
    for i in range(len(fidelity) - 1):
        lo, hi = fidelity[i], fidelity[i + 1]
        if min(lo, hi) <= target <= max(lo, hi):
            if hi == lo:
                return min(quality[i], quality[i + 1])
            t = (target - lo) / (hi - lo)
            return quality[i] + t * (quality[i + 1] - quality[i])
    if len(fidelity) == 1 and fidelity[0] == target:
        return quality[0]
    return math.nan


def excess_over_frontier(
    fidelity: float, quality: float, frontier_fidelity: Sequence[float], frontier_quality: Sequence[float]
) -> float:
    """``quality - frontier_at(target=fidelity)``: how much worse (positive) or better (negative) a point is
    than the frontier at the same fidelity, for a lower-is-better ``quality`` such as FD; ``nan`` outside."""
    return quality - frontier_at(frontier_fidelity, frontier_quality, fidelity)
