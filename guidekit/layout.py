"""Tensor layouts. Strategies see ``(b, c, *spatial)``; models may use any einops layout.

``"b c h w"`` (images), ``"b c f h w"`` (ModelScope, Wan) and ``"b f c h w"`` (CogVideoX) are the common
ones. Conversion happens once, at the edge, with :func:`to_canonical` / :func:`from_canonical`.
"""

from __future__ import annotations

from functools import lru_cache

import einops
from torch import Tensor

from .errors import LayoutError, ShapeError

__all__ = [
    "append_dims",
    "canonical_layout",
    "check_layout",
    "from_canonical",
    "non_batch_dims",
    "parse_layout",
    "to_canonical",
]


@lru_cache(maxsize=64)
def parse_layout(layout: str) -> tuple[str, ...]:
    """Split an einops-style layout such as ``"b f c h w"`` into axis names, validating it.

    The layout must name each axis once, with one ``b`` (batch) and one ``c`` (channels).
    """
    if not isinstance(layout, str):
        raise LayoutError(f"layout: expected a string such as 'b c h w', got {type(layout).__name__}")
    axes = tuple(layout.split())
    if not axes:
        raise LayoutError("layout: expected axis names such as 'b c h w', got an empty string")
    bad = [a for a in axes if not a.isidentifier()]
    if bad:
        raise LayoutError(f"layout: expected space-separated axis names, got {layout!r} (bad: {bad})")
    dupes = sorted({a for a in axes if axes.count(a) > 1})
    if dupes:
        raise LayoutError(f"layout: expected each axis once, got {layout!r} (repeated: {dupes})")
    for required in ("b", "c"):
        if required not in axes:
            raise LayoutError(f"layout: expected an axis named {required!r}, got {layout!r}")
    return axes


def canonical_layout(layout: str) -> str:
    """The canonical order of ``layout``: ``b``, ``c``, then the other axes in their original order."""
    axes = parse_layout(layout)
    rest = [a for a in axes if a not in ("b", "c")]
    return " ".join(["b", "c", *rest])


def check_layout(x: Tensor, layout: str, name: str = "x") -> None:
    """Raise :class:`LayoutError` if ``x`` does not have one dimension per axis of ``layout``."""
    axes = parse_layout(layout)
    if x.ndim != len(axes):
        raise LayoutError(
            f"{name}: layout {layout!r} has {len(axes)} axes but the tensor has {x.ndim} dims (shape {tuple(x.shape)})"
        )


def to_canonical(x: Tensor, layout: str) -> Tensor:
    """Rearrange ``x`` from ``layout`` to ``(b, c, *rest)`` (a view when no permutation is needed)."""
    check_layout(x, layout)
    target = canonical_layout(layout)
    if target == " ".join(parse_layout(layout)):
        return x
    return einops.rearrange(x, f"{layout} -> {target}")


def from_canonical(x: Tensor, layout: str) -> Tensor:
    """Inverse of :func:`to_canonical`."""
    check_layout(x, layout)
    source = canonical_layout(layout)
    if source == " ".join(parse_layout(layout)):
        return x
    return einops.rearrange(x, f"{source} -> {layout}")


def non_batch_dims(x: Tensor) -> tuple[int, ...]:
    """All dims but the batch dim: the per-sample reduction dims for any rank (4D and 5D alike)."""
    if x.ndim < 2:
        raise ShapeError(f"x: expected at least 2 dims (b, c, ...), got shape {tuple(x.shape)}")
    return tuple(range(1, x.ndim))


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so a per-sample ``(b,)`` tensor broadcasts against ``ndim`` dims."""
    if v.ndim > ndim:
        raise ShapeError(f"v: expected at most {ndim} dims, got shape {tuple(v.shape)}")
    return v.reshape(*v.shape, *([1] * (ndim - v.ndim)))
