"""The fast paths of the math floor equal the formulas they replace, and every path is differentiable.

APG's one-pass combination (:func:`apg_from_delta`) against the paper's projection form
(:func:`apg_plain`); SAMG's fused default scale map (:func:`samg_scale_map`) against the channel-mean
energy, min-max normalisation and linear map composed (``fused=False``). Gradients are
checked in float64 with ``torch.autograd.gradcheck`` (issue 18, defect 5: APG detached its coefficients
through ``.tolist()``, SAMG's in-place ops made ``backward()`` raise).
"""

from __future__ import annotations

import pytest
import torch

import guidekit as gk
from guidekit.energy import BoundMapper, DeltaScore, GaussianSmooth, MinMax, QuantileClip, ThresholdMapper
from guidekit.ops.energy import samg_scale_map
from guidekit.ops.guidance import apg, apg_from_delta, apg_plain

SHAPES = [(2, 4, 8, 8), (3, 4, 2, 6, 5), (1, 3, 7)]
F64 = torch.float64


def _pair(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(shape, generator=g, dtype=F64)
    u = c + 0.3 * torch.randn(shape, generator=g, dtype=F64)
    return c.to(dtype), u.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("scale", "eta", "threshold"), [(5.0, 0.0, 0.0), (15.0, 0.0, 1.5), (3.0, 0.7, 100.0)])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_apg_fast_path_equals_the_projection_formula(shape, scale, eta, threshold, dtype) -> None:
    c, u = _pair(shape, dtype)
    fast = apg_from_delta(c, c - u, scale, eta, threshold)
    plain = apg_plain(c, c - u, scale, eta, threshold)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(fast, plain, **tol)
    assert fast.dtype == dtype


def test_apg_fast_path_keeps_the_degenerate_cases_of_the_formula() -> None:
    c, u = _pair((2, 3, 4, 4), F64)
    c[1] = 0.0  # a zero c has no parallel part
    torch.testing.assert_close(apg_from_delta(c, c - u, 4.0, 0.0, 2.0), apg_plain(c, c - u, 4.0, 0.0, 2.0))
    assert torch.equal(apg(c, c, 9.0, 0.0, 2.0), c)  # c == u gives c exactly


def test_apg_on_an_empty_batch_passes_it_through() -> None:
    c = torch.zeros(0, 4, 8, 8)
    assert apg(c, c, 5.0, 0.0, 1.0).shape == c.shape


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("decreasing", [True, False])
@pytest.mark.parametrize("over", ["sample", "frame"])
def test_samg_fused_scale_map_equals_the_composed_formula(shape, decreasing, over) -> None:
    c, u = _pair(shape)
    fused = samg_scale_map(c, u, 4.0, 11.0, decreasing, over)
    plain = samg_scale_map(c, u, 4.0, 11.0, decreasing, over, fused=False)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5 * 11.0)
    assert fused.shape == (shape[0], 1, *shape[2:])


def test_samg_strategy_takes_the_fused_path_with_the_formulas_result() -> None:
    c, u = _pair((2, 4, 8, 8))
    ctx = gk.GuidanceContext.default(c)
    omega = samg_scale_map(c, u, 5.0, 12.0, fused=False)
    torch.testing.assert_close(gk.SAMG(5.0, 12.0)(c, u, ctx), u + omega * (c - u), rtol=1e-5, atol=1e-5)


def _gradcheck(fn, c: torch.Tensor, u: torch.Tensor) -> None:
    c, u = c.detach().requires_grad_(True), u.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (c, u), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3, 2, 3, 4)])
@pytest.mark.parametrize(("eta", "threshold"), [(0.0, 0.0), (0.4, 1.0)])
def test_apg_is_differentiable_in_float64(shape, eta, threshold) -> None:
    c, u = _pair(shape, F64)
    _gradcheck(lambda c, u: apg(c, u, 5.0, eta, threshold), c, u)
    strategy = gk.APG(scale=5.0, eta=eta, norm_threshold=threshold, momentum=-0.5)
    ctx = gk.GuidanceContext.default(c)

    def stepped(c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:  # two steps through the momentum buffer
        state = strategy.init_state(c)
        out, state = strategy.step(c, u, ctx, state)
        out, _ = strategy.step(out, u, ctx.replace(step=1), state)
        return out

    _gradcheck(stepped, c, u)


@pytest.mark.parametrize(
    "samg",
    [
        gk.SAMG(),
        gk.SAMG(transforms=(MinMax(over="frame"),)),
        gk.SAMG(mapper=BoundMapper(5.0, 12.0)),
        gk.SAMG(mapper=ThresholdMapper(5.0, 12.0)),
        gk.SAMG(energy=DeltaScore(), transforms=(QuantileClip(), GaussianSmooth(1.0), MinMax())),
    ],
    ids=["fused", "per-frame", "bound", "threshold", "delta-score-smoothed"],
)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 2, 2, 3, 4)])
def test_samg_is_differentiable_in_float64(samg: gk.SAMG, shape) -> None:
    c, u = _pair(shape, F64)
    ctx = gk.GuidanceContext.default(c)
    _gradcheck(lambda c, u: samg(c, u, ctx), c, u)
    c.requires_grad_(True)
    samg(c, u, ctx).square().sum().backward()  # no in-place op breaks backward()
    assert c.grad is not None and bool(torch.isfinite(c.grad).all())
