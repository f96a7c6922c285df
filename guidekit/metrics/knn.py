"""k-NN precision and recall in feature space (Kynkäänniemi et al. 2019, "Improved Precision and Recall")."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError

__all__ = ["knn_precision_recall", "knn_radii"]


def knn_radii(features: Tensor, k: int) -> Tensor:
    """Distance of each row of ``(n, d)`` features to its ``k``-th nearest other row, ``(n,)``."""
    if not isinstance(k, int) or not 1 <= k < features.shape[0]:
        raise ConfigError(f"k: expected an int in [1, {features.shape[0] - 1}] (fewer than the rows), got {k!r}")
    dist = torch.cdist(features, features)
    return dist.kthvalue(k + 1, dim=1).values  # +1: the row itself sits at distance 0


def _covered(points: Tensor, centres: Tensor, radii: Tensor) -> Tensor:
    """``(n,)`` bool: whether each point lies inside at least one ball ``|p - c| <= r_c``."""
    return (torch.cdist(points, centres) <= radii[None]).any(dim=1)


def knn_precision_recall(
    real: Tensor, fake: Tensor, k: int = 3, real_radii: Tensor | None = None
) -> tuple[float, float]:
    """``(precision, recall)``: the share of ``fake`` rows inside the real manifold estimate (balls of each
    real point's ``k``-NN radius), and the share of ``real`` rows inside the fake manifold estimate.

    ``real_radii``: ``knn_radii(real, k)`` computed once, when one real set is compared many times.
    """
    for x, name in ((real, "real"), (fake, "fake")):
        if not isinstance(x, Tensor) or x.ndim != 2:
            raise ShapeError(f"{name}: expected (n, d) features, got {getattr(x, 'shape', type(x).__name__)}")
    if real.shape[1] != fake.shape[1]:
        raise ShapeError(f"fake: expected {real.shape[1]} columns like real, got {fake.shape[1]}")
    real, fake = real.to(torch.float64), fake.to(torch.float64)
    if real_radii is None:
        real_radii = knn_radii(real, k)
    elif real_radii.shape != (real.shape[0],):
        raise ShapeError(f"real_radii: expected ({real.shape[0]},), one per real row, got {tuple(real_radii.shape)}")
    precision = _covered(fake, real, real_radii.to(torch.float64)).double().mean()
    recall = _covered(real, fake, knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)
