"""guidekit.energy: estimators, transforms and mappers against their definitions (methods.md §2, §3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from samg_gen import ctx_for, energies, pred_pairs, scale_ranges, shapes, sigmas
from scipy import ndimage

import guidekit as gk
from guidekit.context import GuidanceContext
from guidekit.energy import (
    BoundMapper,
    DeltaScore,
    DeltaSquared,
    GaussianSmooth,
    LinearMapper,
    MinMax,
    QuantileClip,
    ThresholdMapper,
    X0DeltaSquared,
)
from guidekit.errors import ConfigError, ShapeError
from guidekit.ops import energy as EF
from guidekit.registry import ENERGY, MAPPERS, TRANSFORMS

CTX = GuidanceContext(sigma=torch.ones(1))


def to_x0(pred: torch.Tensor, x: torch.Tensor, sigma: float, space: str) -> torch.Tensor:
    """The conversions of methods.md §2 written out; ``x`` is the EDM sample, ``sigma`` the EDM sigma."""
    if space == "eps":
        return x - sigma * pred
    if space == "v":  # VP: x_t = alpha x, x0 = alpha x_t - sigma_vp v
        alpha, sigma_vp = 1 / math.sqrt(1 + sigma**2), sigma / math.sqrt(1 + sigma**2)
        return alpha * (alpha * x) - sigma_vp * pred
    if space == "flow":  # t = sigma / (1 + sigma), x_t = (1 - t) x, x0 = x_t - t v
        t = sigma / (1 + sigma)
        return (1 - t) * x - t * pred
    return pred


# -- estimators ---------------------------------------------------------------------------------------
@given(pair=pred_pairs(), reduce=st.sampled_from(["mean", "sum"]))
def test_delta_squared_is_channel_reduction_of_squared_delta(pair, reduce):
    c, u = pair
    e = DeltaSquared(reduce)(c, u, ctx_for(c))
    sq = (c - u) ** 2
    ref = sq.mean(1, keepdim=True) if reduce == "mean" else sq.sum(1, keepdim=True)
    assert e.shape == (c.shape[0], 1, *c.shape[2:])
    assert (e >= 0).all()
    torch.testing.assert_close(e, ref, rtol=1e-12, atol=0)


def _fixed_x_like(c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A seeded x_t on the predictions' scale: hypothesis needs determinism, and the references go through
    ``x - x0``, which loses digits to cancellation when x dwarfs the predictions."""
    size = max(float(c.abs().max()), float(u.abs().max()), 1e-30)
    return size * torch.randn(c.shape, dtype=c.dtype, generator=torch.Generator().manual_seed(0))


@given(pair=pred_pairs(), sigma=sigmas(), space=st.sampled_from(["eps", "v", "flow", "x0"]))
def test_x0_energy_equals_energy_of_explicitly_converted_predictions(pair, sigma, space):
    c, u = pair
    x = _fixed_x_like(c, u)
    ref = DeltaSquared()(to_x0(c, x, sigma, space), to_x0(u, x, sigma, space), ctx_for(c, space="x0"))
    got = X0DeltaSquared()(c, u, ctx_for(c, sigma, space))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-12 * float(ref.max()))


@given(pair=pred_pairs(), sigma=sigmas(), space=st.sampled_from(["v", "flow", "x0"]))
def test_delta_score_is_minus_delta_eps_over_sigma_in_every_space(pair, sigma, space):
    c, u = pair
    x = _fixed_x_like(c, u)
    eps_c, eps_u = ((x - to_x0(p, x, sigma, space)) / sigma for p in (c, u))
    ref = ((-(eps_c - eps_u) / sigma) ** 2).mean(1, keepdim=True)
    got = DeltaScore()(c, u, ctx_for(c, sigma, space))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-12 * float(ref.max()))
    direct = DeltaScore()(eps_c, eps_u, ctx_for(c, sigma, "eps"))
    torch.testing.assert_close(direct, ref, rtol=1e-5, atol=1e-12 * float(ref.max()))


def test_delta_score_refuses_zero_sigma():
    c = torch.randn(2, 3, 4, 4)
    ctx = GuidanceContext(sigma=torch.tensor([1.0, 0.0]))
    with pytest.raises(ConfigError, match=r"ctx.sigma: expected > 0.*\[1.0, 0.0\]"):
        DeltaScore()(c, c, ctx)


def test_x0_estimators_need_a_known_space():
    c = torch.randn(2, 3, 4, 4)
    ctx = GuidanceContext(sigma=torch.ones(2), space=None)
    for estimator in (X0DeltaSquared(), DeltaScore()):
        with pytest.raises(
            ConfigError, match=rf"ctx.space: expected the prediction space .* for {type(estimator).__name__}"
        ):
            estimator(c, 0.5 * c, ctx)
    assert DeltaSquared()(c, 0.5 * c, ctx).shape == (2, 1, 4, 4)


def test_delta_score_at_infinite_sigma_is_zero_energy():
    c = torch.randn(2, 3, 4, 4)
    e = DeltaScore()(c, 0.5 * c, GuidanceContext(sigma=torch.tensor([float("inf"), 1.0]), space="flow"))
    assert torch.isfinite(e).all() and (e[0] == 0).all() and (e[1] > 0).any()


def test_estimators_name_a_sigma_of_the_wrong_length():
    c = torch.randn(2, 3, 4, 4)
    with pytest.raises(ShapeError, match=r"ctx.sigma: expected 2 values.*\(3,\)"):
        X0DeltaSquared()(c, c, GuidanceContext(sigma=torch.ones(3)))


def test_half_precision_energy_is_computed_in_float32():
    c = torch.randn(1, 4, 8, 8)
    u = c + 1e-2 * torch.randn(1, 4, 8, 8)
    e = DeltaSquared()(c.half(), u.half(), ctx_for(c))
    assert e.dtype == torch.float32
    torch.testing.assert_close(e, ((c.half().float() - u.half().float()) ** 2).mean(1, keepdim=True))


# -- transforms ---------------------------------------------------------------------------------------
@given(e=energies(), a=st.floats(1e-6, 1e6))
def test_minmax_maps_to_unit_interval_and_is_exactly_scale_invariant(e, a):
    n = MinMax()(e, CTX)
    flat = n.flatten(1)
    assert (flat >= 0).all() and (flat <= 1).all()
    assert (flat.amin(1) == 0).all()
    hi = e.flatten(1).amax(1)
    span = hi - e.flatten(1).amin(1)
    torch.testing.assert_close(flat.amax(1), span / (span + EF.DEFAULT_TAU * hi).clamp_min(1e-300))  # max -> 1 - O(tau)
    torch.testing.assert_close(MinMax()(a * e, CTX), n, rtol=1e-12, atol=1e-12)


@given(e=energies(ndim=5))
def test_minmax_per_frame_gives_each_frame_the_full_range(e):
    n = MinMax(over="frame")(e, CTX)
    per_frame = n.flatten(3)
    e_hi = e.flatten(3).amax(-1)
    span = e_hi - e.flatten(3).amin(-1)
    assert (per_frame.amin(-1) == 0).all()
    torch.testing.assert_close(per_frame.amax(-1), span / (span + EF.DEFAULT_TAU * e_hi).clamp_min(1e-300))


@given(e=energies(ndim=4))
def test_minmax_per_frame_treats_an_image_as_one_frame(e):
    assert torch.equal(MinMax(over="frame")(e, CTX), MinMax()(e, CTX))


def test_minmax_of_zero_and_uniform_energy_is_zero_not_nan():
    for e in (torch.zeros(2, 1, 3, 3), torch.full((2, 1, 3, 3), 7.0)):
        for tau in (0.0, 1e-8):
            assert torch.equal(MinMax(tau=tau)(e, CTX), torch.zeros_like(e))


@settings(max_examples=30)
@given(e=energies(), sigma=st.floats(0.3, 3.0), truncate=st.sampled_from([1.0, 2.0, 4.0]))
def test_gaussian_smooth_matches_scipy_mirror_filter(e, sigma, truncate):
    got = GaussianSmooth(sigma, truncate)(e, CTX)
    axes = (0.0,) * (e.ndim - 2) + (sigma, sigma)
    ref = ndimage.gaussian_filter(e.numpy(), sigma=axes, mode="mirror", truncate=truncate)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12 * float(e.max()))


@given(e=energies(), sigma=st.floats(0.3, 3.0))
def test_gaussian_smooth_stays_in_range_and_commutes_with_flips(e, sigma):
    smooth = GaussianSmooth(sigma)
    out = smooth(e, CTX)
    tol = 1e-12 * (1.0 + float(e.abs().max()))  # a convex combination, up to float64 rounding (relative)
    assert out.min() >= e.min() - tol and out.max() <= e.max() + tol
    for dims in ((-1,), (-2,), (-2, -1)):
        torch.testing.assert_close(smooth(e.flip(dims), CTX), out.flip(dims), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(smooth(torch.full_like(e, 3.0), CTX), torch.full_like(e, 3.0))
    assert smooth.unit_range(True) and not smooth.unit_range(False)


def test_gaussian_smooth_sigma_zero_is_identity_and_lower_ranks_blur_what_they_have():
    e = torch.rand(2, 1, 5, 5, dtype=torch.float64)
    assert GaussianSmooth(0.0)(e, CTX) is e
    line = torch.rand(2, 1, 7, dtype=torch.float64)  # (b, 1, l): along l only
    ref = ndimage.gaussian_filter(line.numpy(), sigma=(0, 0, 1.2), mode="mirror", truncate=4.0)
    np.testing.assert_allclose(GaussianSmooth(1.2)(line, CTX).numpy(), ref, rtol=1e-12)
    point = torch.rand(2, 1)
    assert GaussianSmooth(1.0)(point, CTX) is point


@given(n=st.integers(1, 9), radius=st.integers(0, 20))
def test_reflect_indices_match_numpy_reflect_padding(n, radius):
    ref = np.pad(np.arange(n), radius, mode="reflect") if n > 1 else np.zeros(n + 2 * radius, dtype=int)
    assert EF.reflect_indices(n, radius).tolist() == ref.tolist()


@given(e=energies(), q=st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted))
def test_quantile_clip_clamps_to_per_sample_quantiles(e, q):
    q_lo, q_hi = q
    out = QuantileClip(q_lo, q_hi)(e, CTX)
    flat = e.flatten(1)
    lo = torch.quantile(flat, q_lo, dim=1).view(-1, *([1] * (e.ndim - 1)))
    hi = torch.quantile(flat, q_hi, dim=1).view(-1, *([1] * (e.ndim - 1)))
    torch.testing.assert_close(out, torch.minimum(torch.maximum(e, lo), hi), rtol=1e-12, atol=1e-12)
    assert torch.equal(QuantileClip(0.0, 1.0)(e, CTX), e)


@given(rows=st.integers(1, 3), n=st.integers(1, 200), q=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_per_sample_quantile_matches_torch_quantile(rows, n, q, seed):
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(EF.per_sample_quantile(x, q), torch.quantile(x, q, dim=1), rtol=1e-12, atol=1e-12)


# -- mappers ------------------------------------------------------------------------------------------
def make_mapper(kind: str, w_min: float, w_max: float, direction: str = "decreasing"):
    if kind == "linear":
        return LinearMapper(w_min, w_max, direction)
    if kind == "threshold":
        return ThresholdMapper(w_min, w_max, direction, q=0.6)
    return BoundMapper(w_min, w_max, direction, k=0.7)


@given(e=energies(unit=True), r=scale_ranges(), kind=st.sampled_from(["linear", "threshold", "bound"]))
def test_mappers_are_bounded_monotone_and_mirrored_by_direction(e, r, kind):
    dec = make_mapper(kind, *r)(e, CTX)
    inc = make_mapper(kind, *r, "increasing")(e, CTX)
    for omega in (dec, inc):
        assert omega.shape == e.shape
        assert (omega >= r[0]).all() and (omega <= r[1]).all()
    torch.testing.assert_close(dec + inc, torch.full_like(e, r[0] + r[1]), rtol=1e-12, atol=1e-12)
    for b in range(e.shape[0]):  # decreasing: higher energy never gets a higher scale
        order = e[b].flatten().argsort()
        assert (dec[b].flatten()[order].diff() <= 1e-12).all()


@given(e=energies(unit=True), r=scale_ranges())
def test_linear_mapper_formula(e, r):
    w_min, w_max = r
    torch.testing.assert_close(LinearMapper(w_min, w_max)(e, CTX), w_max - e * (w_max - w_min))
    torch.testing.assert_close(LinearMapper(w_min, w_max, "increasing")(e, CTX), w_min + e * (w_max - w_min))


@given(e=energies(), q=st.floats(0, 1))
def test_threshold_mapper_is_two_level_at_the_quantile(e, q):
    quantile = torch.quantile(e.flatten(1), q, dim=1).view(-1, *([1] * (e.ndim - 1)))
    omega = ThresholdMapper(2.0, 9.0, q=q, tau=0.0)(e, CTX)
    assert torch.equal(omega, torch.where(e > quantile, 2.0, 9.0).to(omega.dtype))
    margin = quantile + 1e-3 * e.flatten(1).amax(1).view_as(quantile)
    omega = ThresholdMapper(2.0, 9.0, q=q, tau=1e-3)(e, CTX)
    assert torch.equal(omega, torch.where(e > margin, 2.0, 9.0).to(omega.dtype))


@given(e=energies(), k=st.floats(0, 10), r=scale_ranges())
def test_bound_mapper_is_clipped_curvature_bound(e, k, r):
    omega = BoundMapper(*r, k=k, eps=1e-9)(e, CTX)
    ref = (1 + k / torch.sqrt(e + 1e-9)).clamp(*r)
    torch.testing.assert_close(omega, ref, rtol=1e-12, atol=1e-12)


def test_mapper_uniform_energy_gives_w_max_for_linear_and_threshold():
    e = torch.zeros(2, 1, 4, 4)
    assert torch.equal(LinearMapper(3, 8)(e, CTX), torch.full_like(e, 8.0))
    assert torch.equal(ThresholdMapper(3, 8)(torch.full_like(e, 0.4), CTX), torch.full_like(e, 8.0))
    assert torch.equal(BoundMapper(3, 8)(e, CTX), torch.full_like(e, 8.0))


# -- configuration and registry -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("factory", "pattern"),
    [
        (lambda: LinearMapper(12, 5), r"w_min, w_max: expected w_min <= w_max, got w_min=12.0 > w_max=5.0"),
        (lambda: ThresholdMapper(q=1.5), r"q: expected a number <= 1.0, got 1.5"),
        (lambda: ThresholdMapper(q=-0.1), r"q: expected a number >= 0.0, got -0.1"),
        (lambda: ThresholdMapper(tau=-1.0), r"tau: expected a number >= 0.0, got -1.0"),
        (lambda: BoundMapper(k=-1), r"k: expected a number >= 0.0, got -1"),
        (lambda: BoundMapper(eps=0), r"eps: expected a number > 0, got 0"),
        (lambda: LinearMapper(direction="up"), r"direction: expected one of 'decreasing', 'increasing', got 'up'"),
        (lambda: LinearMapper("5", 12), r"w_min: expected a finite number, got '5'"),
        (lambda: LinearMapper(float("nan"), 12), r"w_min: expected a finite number, got nan"),
        (lambda: MinMax(tau=-1e-8), r"tau: expected a number >= 0.0, got -1e-08"),
        (lambda: MinMax(over="clip"), r"over: expected one of 'sample', 'frame', got 'clip'"),
        (lambda: GaussianSmooth(sigma=-1), r"sigma: expected a number >= 0.0, got -1"),
        (lambda: QuantileClip(0.9, 0.1), r"q_lo, q_hi: expected q_lo <= q_hi, got q_lo=0.9 > q_hi=0.1"),
        (lambda: QuantileClip(0.1, 2), r"q_hi: expected a number <= 1.0, got 2"),
        (lambda: DeltaSquared(reduce="max"), r"reduce: expected one of 'mean', 'sum', got 'max'"),
    ],
)
def test_bad_parameters_raise_config_errors_naming_them(factory, pattern):
    with pytest.raises(ConfigError, match=pattern):
        factory()


@pytest.mark.parametrize(
    ("registry", "names"),
    [
        (ENERGY, {"delta-sq", "x0-delta-sq", "delta-score"}),
        (TRANSFORMS, {"minmax", "gaussian-smooth", "quantile-clip"}),
        (MAPPERS, {"linear", "threshold", "bound"}),
    ],
)
def test_builtins_are_registered_and_round_trip(registry, names):
    assert names <= set(registry.names())
    for name in names:
        obj = registry.get(name)()
        assert gk.build(gk.to_spec(obj).model_dump_json(), registry) == obj


@given(shape=shapes(), kind=st.sampled_from(["linear", "threshold", "bound"]))
@settings(max_examples=10)
def test_scale_maps_of_every_mapper_keep_the_energy_shape(shape, kind):
    e = torch.rand(shape[0], 1, *shape[2:])
    assert make_mapper(kind, 1.0, 4.0)(e, CTX).shape == e.shape


@given(e=energies(), scale=st.floats(2.0, 11.0), q=st.floats(0.05, 0.95))
def test_bound_k_puts_the_chosen_quantile_at_the_chosen_scale(e, scale, q):
    quantile = float(torch.quantile(e.flatten(), q))
    if quantile <= 0:
        return  # a zero quantile energy maps to w_max whatever K is
    k = EF.bound_k(e, scale, q)
    at_quantile = BoundMapper(1.0, 12.0, k=k, eps=1e-30)(torch.tensor([[[[quantile]]]], dtype=e.dtype), CTX)
    assert float(at_quantile) == pytest.approx(scale, rel=1e-9)
