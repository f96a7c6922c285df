"""Fréchet distance between Gaussian fits of two feature sets (Heusel et al. 2017, eq. 6)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ShapeError
from ..ops.checks import all_finite

__all__ = ["feature_stats", "frechet_distance", "frechet_distance_from_stats", "per_class_frechet_distance"]


def _check_features(x: Tensor, name: str, min_rows: int = 2) -> None:
    if not isinstance(x, Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ShapeError(f"{name}: expected a (n, d) feature matrix, got {shape}")
    if x.shape[0] < min_rows:
        raise ShapeError(f"{name}: expected at least {min_rows} rows to fit a covariance, got {x.shape[0]}")
    if not all_finite(x):
        raise ShapeError(f"{name}: expected finite features, got NaN/Inf")


def feature_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(d,)`` and unbiased covariance ``(d, d)`` of ``(n, d)`` features, in float64."""
    _check_features(features, "features")
    x = features.to(torch.float64)
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def _sqrt_psd(m: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (roundoff negatives -> 0)."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance_from_stats(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor, eps: float = 1e-6) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` with ``S = cov + eps I``.

    The matrix square root goes through symmetric eigendecompositions (no complex ``sqrtm``), so the
    result is real; it is symmetric in ``a`` and ``b`` up to roundoff.
    """
    d = mu_a.shape[0]
    if mu_b.shape != (d,) or cov_a.shape != (d, d) or cov_b.shape != (d, d):
        raise ShapeError(
            f"stats: expected mu (d,) and cov (d, d) with one d, got {tuple(mu_a.shape)}, {tuple(cov_a.shape)}, "
            f"{tuple(mu_b.shape)}, {tuple(cov_b.shape)}"
        )
    eye = torch.eye(d, dtype=torch.float64, device=cov_a.device)
    sa, sb = cov_a.to(torch.float64) + eps * eye, cov_b.to(torch.float64) + eps * eye
    root_a = _sqrt_psd(sa)
    cross = torch.linalg.eigvalsh(root_a @ sb @ root_a).clamp(min=0).sqrt().sum()
    diff = (mu_a.to(torch.float64) - mu_b.to(torch.float64)).square().sum()
    return float(diff + torch.trace(sa) + torch.trace(sb) - 2.0 * cross)


def frechet_distance(features_a: Tensor, features_b: Tensor, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussian fits of ``(n, d)`` and ``(m, d)`` feature sets.

    ``eps`` (default ``1e-6``) is added to both covariances' diagonals. Biased upward for small sets:
    compare values only at equal set sizes.
    """
    _check_features(features_a, "features_a")
    _check_features(features_b, "features_b")
    if features_a.shape[1] != features_b.shape[1]:
        raise ShapeError(
            f"features_b: expected {features_a.shape[1]} columns like features_a, got {features_b.shape[1]}"
        )
    return frechet_distance_from_stats(*feature_stats(features_a), *feature_stats(features_b), eps=eps)


def per_class_frechet_distance(
    features: Tensor, labels: Tensor, ref_features: Tensor, ref_labels: Tensor, eps: float = 1e-6
) -> dict[int, float]:
    """FD of each class's generated features against the same class in the reference set.

    Only classes with at least two samples on both sides are reported.
    """
    for x, y, name in ((features, labels, "labels"), (ref_features, ref_labels, "ref_labels")):
        if labels.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ShapeError(f"{name}: expected ({x.shape[0]},) labels, one per feature row, got {tuple(y.shape)}")
    out: dict[int, float] = {}
    for c in sorted(set(labels.tolist()) & set(ref_labels.tolist())):
        a, b = features[labels == c], ref_features[ref_labels == c]
        if len(a) >= 2 and len(b) >= 2:
            out[int(c)] = frechet_distance(a, b, eps=eps)
    return out
