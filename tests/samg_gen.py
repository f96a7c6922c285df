"""Hypothesis generators for the SAMG / energy tests: shapes, prediction pairs, energies, scale ranges; and
:func:`ctx_for`, the guidance context they evaluate in.

Tensors are drawn from a hypothesis-chosen seed, scale and *kind*, so shrinking stays cheap while values
still vary. The kinds extend :data:`guidekit.testing.KINDS` (equal, tiny Δ, offset, zero or constant
samples, ...) with three that matter for a spatial scale: dense Gaussian, heavy-tailed Δ (a few
dominant points) and sparse Δ (many points with ``c == u`` exactly).
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import Tensor

from guidekit.context import GuidanceContext
from guidekit.testing import KINDS as CONTRACT_KINDS
from guidekit.testing import make_pair

KINDS = ("normal", "heavy", "sparse")


def ctx_for(x: torch.Tensor, sigma: float = 1.0, space: str = "eps") -> GuidanceContext:
    return GuidanceContext.default(x, sigma=sigma, space=space)


@st.composite
def shapes(draw: st.DrawFn, ndim: int | None = None) -> tuple[int, ...]:
    """``(b, c, h, w)`` or ``(b, c, f, h, w)`` with small, possibly unit, axes."""
    ndim = draw(st.sampled_from((4, 5))) if ndim is None else ndim
    b = draw(st.integers(1, 3))
    c = draw(st.integers(1, 5))
    spatial = tuple(draw(st.integers(1, 6)) for _ in range(ndim - 2))
    return (b, c, *spatial)


def _tensor(shape: tuple[int, ...], gen: torch.Generator, kind: str, dtype: torch.dtype) -> Tensor:
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "heavy":
        x = x * torch.exp(2.0 * torch.randn(shape, generator=gen, dtype=torch.float64))
    return x.to(dtype)


@st.composite
def pred_pairs(
    draw: st.DrawFn, shape: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """``(pred_cond, pred_uncond)``: the "sparse" kind sets ``c == u`` on a random subset of points."""
    shape = draw(shapes()) if shape is None else shape
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(KINDS + CONTRACT_KINDS))
    scale = draw(st.sampled_from((1e-3, 1.0, 50.0)))
    if kind in CONTRACT_KINDS:
        return make_pair(shape, kind, seed, scale, dtype)
    gen = torch.Generator().manual_seed(seed)
    u = _tensor(shape, gen, "normal", dtype) * scale
    delta = _tensor(shape, gen, kind, dtype) * scale
    if kind == "sparse":
        keep = torch.rand((shape[0], 1, *shape[2:]), generator=gen) < 0.5
        delta = delta * keep.to(dtype)
    return u + delta, u


@st.composite
def energies(draw: st.DrawFn, ndim: int | None = None, unit: bool = False) -> Tensor:
    """A non-negative energy ``(b, 1, *spatial)`` (float64); ``unit=True`` scales it into ``[0, 1]``."""
    shape = draw(shapes(ndim))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(KINDS))
    e = _tensor((shape[0], 1, *shape[2:]), gen, kind, torch.float64).square()
    if kind == "sparse":
        e = torch.where(e > 1.0, e, torch.zeros_like(e))
    if unit:
        e = e / e.flatten(1).amax(1).clamp_min(1e-300).view(-1, *([1] * (e.ndim - 1)))
    return e


@st.composite
def scale_ranges(draw: st.DrawFn) -> tuple[float, float]:
    """``(w_min, w_max)`` with ``w_min <= w_max``, equal about one time in five."""
    w_min = draw(st.floats(-2.0, 15.0, allow_nan=False))
    width = draw(st.one_of(st.just(0.0), st.floats(0.01, 15.0)))
    return w_min, w_min + width


def sigmas(low: float = 0.01, high: float = 50.0) -> st.SearchStrategy[float]:
    """An EDM sigma in ``[low, high]``."""
    return st.floats(low, high, allow_nan=False)
