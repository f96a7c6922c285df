"""Shapes, layouts and working precision: the helpers every formula uses to treat 4D and 5D alike.

Strategies see ``(b, c, *spatial)``; models may use any einops layout. ``"b c h w"`` (images),
``"b c f h w"`` (ModelScope, Wan) and ``"b f c h w"`` (CogVideoX) are the common ones. Conversion happens
once, at the edge, with :func:`to_canonical` / :func:`from_canonical`. Per-sample values ``(b,)``
broadcast against any rank with :func:`append_dims` / :func:`per_sample`; per-sample reductions run
over :func:`non_batch_dims`; per-frame image operators see a clip as a batch of images through
:func:`frames_as_images` / :func:`images_as_frames`.
"""

from __future__ import annotations

from functools import lru_cache

import einops
import torch
from torch import Tensor

from ..errors import LayoutError, ShapeError

__all__ = [
    "append_dims",
    "canonical_layout",
    "check_layout",
    "compute_dtype",
    "frames_as_images",
    "from_canonical",
    "images_as_frames",
    "non_batch_dims",
    "parse_layout",
    "per_sample",
    "per_sample_full",
    "to_canonical",
    "upcast",
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


def _rearrange(x: Tensor, source: str, target: str) -> Tensor:
    """``x`` from ``source`` to ``target`` (two orders of the same axes); ``x`` itself when they agree."""
    return x if source == target else einops.rearrange(x, f"{source} -> {target}")


def to_canonical(x: Tensor, layout: str) -> Tensor:
    """Rearrange ``x`` from ``layout`` to ``(b, c, *rest)`` (a view when no permutation is needed)."""
    check_layout(x, layout)
    return _rearrange(x, " ".join(parse_layout(layout)), canonical_layout(layout))


def from_canonical(x: Tensor, layout: str) -> Tensor:
    """Inverse of :func:`to_canonical`."""
    check_layout(x, layout)
    return _rearrange(x, canonical_layout(layout), " ".join(parse_layout(layout)))


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


def per_sample(v: Tensor, like: Tensor, name: str = "ctx.sigma", *, dtype: torch.dtype | None = None) -> Tensor:
    """A ``(b,)`` (or one-element) per-sample tensor shaped to broadcast against ``like``.

    On ``like``'s device, in ``dtype`` (default ``like.dtype``). A size other than ``b`` or 1 raises
    :class:`ShapeError` naming ``name``.
    """
    b = like.shape[0]
    if v.numel() not in (1, b):
        raise ShapeError(f"{name}: expected {b} values (one per sample) or one, got shape {tuple(v.shape)}")
    return append_dims(v.reshape(-1), like.ndim).to(device=like.device, dtype=like.dtype if dtype is None else dtype)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The working dtype of the formulas for ``x``: float64 stays float64, everything else computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def per_sample_full(like: Tensor, value: float) -> Tensor:
    """A ``(b, 1, ..., 1)`` tensor of ``value`` in ``like``'s dtype and device: a uniform per-sample scale map."""
    return like.new_full((like.shape[0],) + (1,) * (like.ndim - 1), float(value))


def upcast(x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``x`` in at least ``dtype`` precision (float64 stays float64): the working dtype of the formulas."""
    if x.dtype == torch.float64 or x.dtype == dtype:
        return x
    return x.to(dtype)


def frames_as_images(x: Tensor) -> Tensor:
    """``(b, c, h, w)`` as is; ``(b, c, l)`` as ``(b, c, 1, l)``; ``(b, c, f, ..., h, w)`` as ``(b·f·..., c, h, w)``.

    Lets a 2-D image operator (a pyramid, a blur) run on 1-D signals and on each frame of a clip.
    """
    if x.ndim < 3:
        raise ShapeError(f"pred_cond: expected (b, c, l), (b, c, h, w) or (b, c, f, h, w), got {tuple(x.shape)}")
    if x.ndim == 3:
        return x.unsqueeze(-2)
    if x.ndim == 4:
        return x
    c, h, w = x.shape[1], x.shape[-2], x.shape[-1]
    return x.movedim(1, -3).reshape(-1, c, h, w)


def images_as_frames(y: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`frames_as_images`: back to the shape of ``like``."""
    if like.ndim == 3:
        return y.squeeze(-2)
    if like.ndim == 4:
        return y
    b, c = like.shape[:2]
    frames = like.shape[2:-2]
    return y.reshape(b, *frames, c, *like.shape[-2:]).movedim(-3, 1)
