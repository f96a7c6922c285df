"""SAMG: the invariants S1-S9 of methods.md §11, configuration, layouts and errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from samg_gen import ctx_for, pred_pairs, scale_ranges, shapes, sigmas

import guidekit as gk
from guidekit.energy import (
    BoundMapper,
    DeltaScore,
    DeltaSquared,
    EnergyEstimator,
    GaussianSmooth,
    LinearMapper,
    MinMax,
    QuantileClip,
    ThresholdMapper,
    X0DeltaSquared,
)
from guidekit.errors import ConfigError, ShapeError
from guidekit.ops import energy as EF
from guidekit.ops.shapes import from_canonical, to_canonical

MAPPER_KINDS = ("linear", "threshold", "bound")


def samg(kind: str, w_min: float, w_max: float, direction: str = "decreasing", **kwargs) -> gk.SAMG:
    """SAMG with the given mapper kind; the bound mapper gets K = 1 in x0 units of the test data."""
    mappers = {
        "linear": lambda: LinearMapper(w_min, w_max, direction),
        "threshold": lambda: ThresholdMapper(w_min, w_max, direction, q=0.6),
        "bound": lambda: BoundMapper(w_min, w_max, direction, k=1.0),
    }
    return gk.SAMG(mapper=mappers[kind](), **kwargs)


def effective_scale(out, c, u):
    """``(ĝ - u) / Δ`` where ``|Δ|`` is well above rounding, and the mask of those points."""
    delta = c - u
    mask = delta.abs() > 1e-6 * torch.maximum(c.abs(), u.abs()).clamp_min(1e-300)
    return (out - u)[mask] / delta[mask], mask


# -- S1-S4 -----------------------------------------------------------------------------------------------
@given(pair=pred_pairs(), r=scale_ranges(), kind=st.sampled_from(MAPPER_KINDS))
def test_s1_effective_scale_lies_in_range(pair, r, kind):
    c, u = pair
    out = samg(kind, *r)(c, u, ctx_for(c))
    eff, _ = effective_scale(out, c, u)
    tol = 1e-6 * (1 + max(abs(r[0]), abs(r[1])))
    assert (eff >= r[0] - tol).all() and (eff <= r[1] + tol).all()


@given(pair=pred_pairs(), w=st.floats(-3, 20), kind=st.sampled_from(MAPPER_KINDS))
def test_s2_equal_bounds_is_exactly_cfg(pair, w, kind):
    for dtype in (torch.float64, torch.float32):
        c, u = (p.to(dtype) for p in pair)
        ctx = ctx_for(c)
        assert torch.equal(samg(kind, w, w)(c, u, ctx), gk.CFG(w)(c, u, ctx))


@given(pair=pred_pairs(), r=scale_ranges(), kind=st.sampled_from(MAPPER_KINDS))
def test_s3_scale_is_monotone_in_energy_with_extremes_at_w_min_and_w_max(pair, r, kind):
    c, u = pair
    ctx = ctx_for(c)
    s = samg(kind, *r)
    omega = s.scale_map(c, u, ctx)
    energy = s.energy(c, u, ctx)
    for b in range(c.shape[0]):
        e, o = energy[b].flatten(), omega[b].flatten()
        order = e.argsort()
        assert (o[order].diff() <= 1e-9 * (1 + abs(r[1]))).all()
        if kind == "linear" and e.max() > e.min():  # arg-max -> w_min up to tau, arg-min -> w_max
            span = float(e.max() - e.min())
            expected = r[1] - (r[1] - r[0]) * span / (span + EF.DEFAULT_TAU * float(e.max()))
            assert float(o[e.argmax()]) == pytest.approx(expected, rel=1e-9, abs=1e-9)
            assert o[e.argmin()] == r[1]


@given(pair=pred_pairs(), r=scale_ranges(), kind=st.sampled_from(MAPPER_KINDS))
def test_s4_scale_is_shared_by_all_channels(pair, r, kind):
    c, u = pair
    ctx = ctx_for(c)
    s = samg(kind, *r)
    omega = s.scale_map(c, u, ctx)
    assert omega.shape == (c.shape[0], 1, *c.shape[2:])
    torch.testing.assert_close(s(c, u, ctx), u + omega * (c - u), rtol=1e-12, atol=1e-12 * float(c.abs().max()))


# -- S5, S6: invariances -------------------------------------------------------------------------------
@given(pair=pred_pairs(), r=scale_ranges(), a=st.floats(1e-3, 1e3), shift=st.floats(-10, 10))
def test_s5_scale_and_shift_invariance(pair, r, a, shift):
    c, u = pair
    ctx = ctx_for(c)
    for kind in ("linear", "threshold"):
        s = samg(kind, *r)
        out = s(c, u, ctx)
        atol = 1e-9 * (1 + abs(r[1])) * float((c - u).abs().max() + c.abs().max() + abs(shift))
        torch.testing.assert_close(s(a * c, a * u, ctx), a * out, rtol=1e-9, atol=a * atol)
        torch.testing.assert_close(s(c + shift, u + shift, ctx), out + shift, rtol=1e-9, atol=atol)
    s = samg("bound", *r)  # absolute energy: shift-invariant only
    torch.testing.assert_close(
        s(c + shift, u + shift, ctx), s(c, u, ctx) + shift, rtol=1e-9, atol=1e-9 * (1 + abs(shift))
    )


def _to_x0(pred, x, sigma, space):
    """methods.md §2 for an EDM sample ``x`` (VP: x_t = alpha x; flow: x_t = (1 - t) x)."""
    if space == "eps":
        return x - sigma * pred
    if space == "v":
        alpha, sigma_vp = 1 / math.sqrt(1 + sigma**2), sigma / math.sqrt(1 + sigma**2)
        return alpha * alpha * x - sigma_vp * pred
    t = sigma / (1 + sigma)
    return (1 - t) * x - t * pred


@given(
    pair=pred_pairs(),
    r=scale_ranges(),
    sigma=sigmas(0.05, 20.0),
    space=st.sampled_from(["eps", "v", "flow"]),
    kind=st.sampled_from(MAPPER_KINDS),
)
def test_s6_guiding_then_converting_equals_guiding_in_x0(pair, r, sigma, space, kind):
    c, u = pair
    x = torch.randn_like(c)
    s = samg(kind, *r)  # the bound mapper reads its energy in x0 through ctx.space
    out_native = s(c, u, ctx_for(c, sigma, space))
    out_x0 = s(_to_x0(c, x, sigma, space), _to_x0(u, x, sigma, space), ctx_for(c, sigma, "x0"))
    scale = float(_to_x0(c, x, sigma, space).abs().max() + x.abs().max())
    torch.testing.assert_close(
        _to_x0(out_native, x, sigma, space), out_x0, rtol=1e-7, atol=1e-7 * scale * (1 + abs(r[1]))
    )


# -- S7: equivariances -------------------------------------------------------------------------------
@given(pair=pred_pairs(), kind=st.sampled_from(MAPPER_KINDS), data=st.data())
def test_s7_equivariant_to_channel_and_spatial_permutations(pair, kind, data):
    c, u = pair
    ctx = ctx_for(c)
    s = samg(kind, 2.0, 9.0)
    out = s(c, u, ctx)
    perm = torch.tensor(data.draw(st.permutations(range(c.shape[1]))))
    torch.testing.assert_close(s(c[:, perm], u[:, perm], ctx), out[:, perm], rtol=1e-12, atol=1e-12)
    n = math.prod(c.shape[2:])
    order = torch.tensor(data.draw(st.permutations(range(n))))

    def shuffle(t):
        return t.flatten(2)[..., order].reshape(t.shape)

    torch.testing.assert_close(s(shuffle(c), shuffle(u), ctx), shuffle(out), rtol=1e-12, atol=1e-12)


@settings(max_examples=30)
@given(pair=pred_pairs(), sigma=st.floats(0.3, 2.0), kind=st.sampled_from(MAPPER_KINDS))
def test_s7_smoothing_commutes_with_spatial_flips(pair, sigma, kind):
    c, u = pair
    ctx = ctx_for(c)
    transforms = (GaussianSmooth(sigma), MinMax()) if kind == "linear" else (GaussianSmooth(sigma),)
    s = samg(kind, 2.0, 9.0, transforms=transforms)
    out = s(c, u, ctx)
    for dims in [(d,) for d in range(2, c.ndim)] + [tuple(range(2, c.ndim))]:
        flipped = s(c.flip(dims), u.flip(dims), ctx)
        torch.testing.assert_close(flipped, out.flip(dims), rtol=1e-9, atol=1e-9 * float(c.abs().max() + 1))


# -- S8, S9 ----------------------------------------------------------------------------------------------
@given(pair=pred_pairs(), r=scale_ranges(), kind=st.sampled_from(MAPPER_KINDS))
def test_s8_zero_delta_returns_cond_and_uniform_energy_gives_constant_scale(pair, r, kind):
    c, _ = pair
    ctx = ctx_for(c)
    s = samg(kind, *r)
    assert torch.equal(s(c, c, ctx), c)
    # uniform energy: the same channel vector at every point. The channel reduction is not bitwise equal
    # across points (vectorised vs tail loops), so "constant" holds to the rounding noise, damped by tau.
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-3)):
        delta = torch.randn(c.shape[0], c.shape[1], *([1] * (c.ndim - 2)), dtype=dtype).expand(c.shape)
        omega = s.scale_map(delta, torch.zeros_like(delta), ctx)
        first = omega.flatten(1)[:, :1].reshape(-1, *([1] * (c.ndim - 1)))
        torch.testing.assert_close(omega, first.expand_as(omega), rtol=0, atol=tol * (1 + abs(r[1])))
        if kind != "bound":
            torch.testing.assert_close(omega, torch.full_like(omega, r[1]), rtol=0, atol=tol * (1 + abs(r[1])))


@given(shape=shapes(ndim=5).filter(lambda s: s[2] >= 2), seed=st.integers(0, 2**16))
def test_s9_clip_normalisation_is_global_and_frame_normalisation_per_frame(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(shape, generator=gen, dtype=torch.float64)
    frame_gain = torch.linspace(0.5, 4.0, shape[2], dtype=torch.float64).view(1, 1, -1, 1, 1)
    delta = torch.randn(shape, generator=gen, dtype=torch.float64) * frame_gain
    c = u + delta
    ctx = ctx_for(c)
    clip = gk.SAMG(w_min=3, w_max=8).scale_map(c, u, ctx)
    frame = gk.SAMG(w_min=3, w_max=8, transforms=(MinMax(over="frame"),)).scale_map(c, u, ctx)
    energy = DeltaSquared()(c, u, ctx)

    def lowest(e):  # the scale at the highest energy: w_min up to the relative tau
        span = e.max() - e.min()
        return 8.0 - 5.0 * float(span / (span + EF.DEFAULT_TAU * e.max()))

    for b in range(shape[0]):
        e = energy[b, 0]
        f_min, f_max = int(e.flatten(1).amin(1).argmin()), int(e.flatten(1).amax(1).argmax())
        assert clip[b, 0, f_min].max() == 8.0  # the frame holding the clip's minimum gets w_max ...
        assert clip[b, 0, f_max].min() == pytest.approx(lowest(e), rel=1e-12)  # ... the maximum's w_min
        for f in range(shape[2]):
            if f not in (f_min, f_max):  # other frames: a strict sub-range of [w_min, w_max]
                assert clip[b, 0, f].max() < 8.0 and clip[b, 0, f].min() > lowest(e) - 1e-12
            if e[f].max() > e[f].min():  # per frame: every frame spans its own range
                assert frame[b, 0, f].max() == 8.0
                assert frame[b, 0, f].min() == pytest.approx(lowest(e[f]), rel=1e-12)


@given(pair=pred_pairs(), r=scale_ranges(), kind=st.sampled_from(MAPPER_KINDS))
def test_increasing_direction_mirrors_decreasing(pair, r, kind):
    c, u = pair
    ctx = ctx_for(c)
    dec = samg(kind, *r).scale_map(c, u, ctx)
    inc = samg(kind, *r, "increasing").scale_map(c, u, ctx)
    torch.testing.assert_close(dec + inc, torch.full_like(dec, r[0] + r[1]), rtol=1e-9, atol=1e-9 * (1 + abs(r[1])))


# -- references and the fused fast path ---------------------------------------------------------------
@given(pair=pred_pairs(), r=scale_ranges())
def test_default_matches_the_comfy_cfg_megapack_formula(pair, r):
    """methods.md §3.2 written out, with the megapack's tau = 1e-8 made relative to max E."""
    c, u = pair
    w_min, w_max = r
    delta = c - u
    energy = (delta**2).mean(1, keepdim=True)
    flat = energy.flatten(1)
    lo = flat.amin(1).view(-1, *([1] * (c.ndim - 1)))
    hi = flat.amax(1).view(-1, *([1] * (c.ndim - 1)))
    omega = w_max - (energy - lo) / (hi - lo + 1e-8 * hi).clamp_min(1e-300) * (w_max - w_min)
    ref = u + omega * delta
    got = gk.SAMG(w_min=w_min, w_max=w_max, transforms=(MinMax(tau=1e-8),))(c, u, ctx_for(c))
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9 * float(c.abs().max() + 1) * (1 + abs(w_max)))


@given(
    pair=pred_pairs(),
    r=scale_ranges(),
    over=st.sampled_from(["sample", "frame"]),
    direction=st.sampled_from(["decreasing", "increasing"]),
)
def test_fused_default_pipeline_equals_the_staged_components(pair, r, over, direction):
    c, u = pair
    if over == "frame" and c.ndim != 5:
        c, u = c.unsqueeze(2), u.unsqueeze(2)
    ctx = ctx_for(c)
    energy = DeltaSquared()(c, u, ctx)
    fused = EF.minmax_linear_scale(energy, *r, direction == "decreasing", over)
    staged = EF.linear_scale(EF.minmax_normalize(energy, over), *r, direction == "decreasing")
    tol = 1e-12 * (1 + abs(r[1]))
    torch.testing.assert_close(fused, staged, rtol=1e-12, atol=tol)
    # SAMG's fast path (channel sum for the mean) against the three components run one after the other
    minmax, mapper = MinMax(over=over), LinearMapper(*r, direction)
    samg_map = gk.SAMG(transforms=(minmax,), mapper=mapper).scale_map(c, u, ctx)
    torch.testing.assert_close(samg_map, mapper(minmax(energy, ctx), ctx), rtol=1e-9, atol=1e-9 * (1 + abs(r[1])))


# -- dtypes, layouts, batches ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_keeps_shape_and_dtype(dtype):
    c, u = torch.randn(2, 4, 6, 5).to(dtype), torch.randn(2, 4, 6, 5).to(dtype)
    for kind in MAPPER_KINDS:
        out = samg(kind, 3, 9)(c, u)
        assert out.shape == c.shape and out.dtype == dtype and torch.isfinite(out).all()


@given(
    shape=shapes(ndim=5),
    seed=st.integers(0, 2**16),
    normalise_over=st.sampled_from(["sample", "frame"]),
)
def test_cogvideox_layout_via_canonical_matches_a_direct_computation(shape, seed, normalise_over):
    """(b, f, c, h, w) latents: guiding the canonical view equals the formula on the native layout."""
    b, ch, f, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(b, f, ch, h, w, generator=gen, dtype=torch.float64)
    u = torch.randn(b, f, ch, h, w, generator=gen, dtype=torch.float64)
    s = gk.SAMG(w_min=4, w_max=9.6, transforms=(MinMax(over=normalise_over),))
    cc, uc = to_canonical(c, "b f c h w"), to_canonical(u, "b f c h w")
    got = from_canonical(s(cc, uc, ctx_for(cc)), "b f c h w")
    energy = ((c - u) ** 2).mean(2, keepdim=True)  # (b, f, 1, h, w): channel dim 2 of the native layout
    dims = (1, 2, 3, 4) if normalise_over == "sample" else (2, 3, 4)
    lo, hi = energy.amin(dims, keepdim=True), energy.amax(dims, keepdim=True)
    omega = 9.6 - (energy - lo) / (hi - lo + EF.DEFAULT_TAU * hi).clamp_min(1e-300) * (9.6 - 4)
    torch.testing.assert_close(got, u + omega * (c - u), rtol=1e-10, atol=1e-10)


@given(pair=pred_pairs(), kind=st.sampled_from(MAPPER_KINDS), split=st.integers(1, 2))
def test_batch_elements_are_independent(pair, kind, split):
    c, u = pair
    if c.shape[0] <= split:
        c, u = torch.cat([c, c.flip(0) * 2]), torch.cat([u, u.flip(0)])
    s = samg(kind, 2, 10)
    whole = s(c, u, ctx_for(c))
    parts = torch.cat([s(c[:split], u[:split], ctx_for(c[:split])), s(c[split:], u[split:], ctx_for(c[split:]))])
    torch.testing.assert_close(whole, parts, rtol=0, atol=0)


# -- the shared contract on non-default pipelines (the default "samg" is run by the registry-wide test) --
@pytest.mark.parametrize(
    ("strategy", "exempt"),
    [
        (gk.SAMG(mapper=ThresholdMapper(3, 7.5, q=0.8)), ()),
        (gk.SAMG(mapper=BoundMapper(3, 7.5, k=0.5)), ()),
        (gk.SAMG(w=6, energy=DeltaScore(), transforms=(QuantileClip(), MinMax())), ()),
        (gk.SAMG(mapper=LinearMapper(4, 9.6, "increasing")), ()),
        # smoothing and per-frame normalisation couple points across the flattened axes, by design
        (gk.SAMG(transforms=(GaussianSmooth(1.0), MinMax())), ("rank_flattening",)),
        (gk.SAMG(transforms=(MinMax(over="frame"),)), ("rank_flattening",)),
    ],
    ids=["threshold", "bound", "delta-score+quantile-clip", "increasing", "smoothed", "per-frame"],
)
def test_non_default_pipelines_pass_the_shared_contract(strategy, exempt):
    from guidekit.testing import CHECKS, check_strategy

    check_strategy(strategy, checks=[c for c in CHECKS if c not in exempt])


# -- configuration -------------------------------------------------------------------------------------
def test_documented_constructors_agree():
    assert gk.SAMG() == gk.SAMG(w_min=5, w_max=12) == gk.SAMG(w=7.5)
    assert gk.SAMG(w=7.5).w is None
    custom = gk.SAMG(energy=gk.energy.DeltaSquared(), mapper=gk.energy.LinearMapper(5, 12))
    assert custom == gk.SAMG(w_min=5, w_max=12)
    assert (custom.w_min, custom.w_max) == (5.0, 12.0)
    assert gk.SAMG(w=6) == gk.SAMG(w_min=4, w_max=9.6)
    assert gk.SAMG(mapper=BoundMapper(3, 7.5)).energy == X0DeltaSquared()
    assert gk.SAMG(mapper=BoundMapper(3, 7.5)).transforms == ()
    assert gk.SAMG(mapper=ThresholdMapper(3, 7.5)).transforms == ()
    assert gk.SAMG(w_min=3, w_max=7.5, mapper=ThresholdMapper(3, 7.5)).mapper == ThresholdMapper(3, 7.5)
    assert gk.strategies.get("samg") is gk.SAMG


components = st.fixed_dictionaries(
    {
        "r": scale_ranges(),
        "kind": st.sampled_from(MAPPER_KINDS),
        "direction": st.sampled_from(["decreasing", "increasing"]),
        "energy": st.sampled_from([DeltaSquared(), DeltaSquared("sum"), X0DeltaSquared(), DeltaScore()]),
        "pre": st.lists(st.sampled_from([GaussianSmooth(1.5), QuantileClip(0.05, 0.95)]), max_size=2),
        "over": st.sampled_from(["sample", "frame"]),
    }
)


@given(cfg=components)
def test_config_round_trips_through_json(cfg):
    transforms = (*cfg["pre"], MinMax(over=cfg["over"]))
    s = samg(cfg["kind"], *cfg["r"], cfg["direction"], energy=cfg["energy"], transforms=transforms)
    spec = gk.to_spec(s)
    text = spec.model_dump_json()
    assert gk.build(text) == s
    assert gk.build(json.loads(text)) == s
    assert gk.to_spec(gk.build(spec)) == spec


def test_short_json_specs_build():
    assert gk.build({"name": "samg", "params": {"w": 7.5}}) == gk.SAMG()
    spec = {"name": "samg", "params": {"mapper": {"name": "threshold", "params": {"w_min": 3, "w_max": 8, "q": 0.7}}}}
    assert gk.build(spec) == gk.SAMG(mapper=ThresholdMapper(3, 8, q=0.7))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"w_min": 12, "w_max": 5}, r"w_min, w_max: expected w_min <= w_max, got w_min=12.0 > w_max=5.0"),
        ({"w": 7.5, "w_min": 5}, r"w: expected either w or w_min/w_max, got w=7.5, w_min=5"),
        ({"w": -1}, r"w: expected a positive base scale, got -1"),
        ({"w_min": 5}, r"w_max: expected a number when w_min is given, got None"),
        ({"w_max": 5}, r"w_min: expected a number when w_max is given, got None"),
        ({"w_min": "5", "w_max": 12}, r"w_min: expected a finite number, got '5'"),
        ({"w": 6, "mapper": ThresholdMapper()}, r"expected None or the mapper's range \[5.0, 12.0\], got \[4.0, 9.6"),
        ({"mapper": "linear"}, r"mapper: expected a ScaleMapper.*got 'linear'"),
        ({"energy": MinMax()}, r"energy: expected an EnergyEstimator.*got MinMax"),
        ({"transforms": (LinearMapper(),)}, r"transforms: expected a tuple of EnergyTransform"),
        ({"transforms": ()}, r"transforms: expected a normalising transform such as MinMax\(\) before LinearMapper"),
        ({"transforms": (MinMax(), QuantileClip())}, None),  # clipping a [0, 1] energy stays in [0, 1]
        ({"transforms": (QuantileClip(), GaussianSmooth())}, r"transforms: expected a normalising transform"),
    ],
)
def test_bad_samg_configs_raise_config_errors(kwargs, pattern):
    if pattern is None:
        gk.SAMG(**kwargs)
        return
    with pytest.raises(ConfigError, match=pattern):
        gk.SAMG(**kwargs)


def test_nested_spec_errors_name_the_field():
    spec = {"name": "samg", "params": {"mapper": {"name": "linear", "params": {"w_min": 12, "w_max": 5}}}}
    with pytest.raises(ConfigError, match=r"spec\[samg\]\.mapper\[linear\]: w_min, w_max: expected w_min <= w_max"):
        gk.build(spec)
    spec = {"name": "samg", "params": {"transforms": [{"name": "minmax", "params": {"over": "clip"}}]}}
    with pytest.raises(ConfigError, match=r"over"):
        gk.build(spec)


def test_runtime_shape_errors_name_the_culprit():
    c = torch.randn(2, 4, 5, 5)
    with pytest.raises(ShapeError, match="pred_uncond: expected the shape of pred_cond"):
        gk.SAMG()(c, torch.randn(2, 4, 5, 4))

    class ChannelEnergy(EnergyEstimator):  # a broken plugin estimator that keeps the channels
        def __call__(self, pred_cond, pred_uncond, ctx):
            return (pred_cond - pred_uncond).abs()

    s = gk.SAMG(energy=ChannelEnergy())
    with pytest.raises(
        ShapeError, match=r"energy: expected ChannelEnergy to return \(2, 1, 5, 5\), got \(2, 4, 5, 5\)"
    ):
        s(c, torch.randn_like(c))


def test_unit_range_collapses_to_conditional_only():
    s = gk.SAMG(w_min=1, w_max=1)
    c = torch.randn(1, 2, 3, 3)
    assert not s.needs_uncond(ctx_for(c)) and gk.SAMG().needs_uncond(ctx_for(c))
    assert s(c, torch.randn_like(c)) is c


# -- in the sampling loop ----------------------------------------------------------------------------------
def _toy_x0_model(x, sigma, cond):
    """A conditional EDM denoiser ``(x, sigma, cond) -> x0`` on ``(b, f, c, h, w)``: cond 1 adds a pattern."""
    s = sigma.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    rows, cols = torch.linspace(0, 1, x.shape[-2], dtype=x.dtype), torch.linspace(-1, 1, x.shape[-1], dtype=x.dtype)
    pattern = rows[:, None] * cols
    return torch.tanh(x / torch.sqrt(1 + s**2)) + cond.view(-1, *([1] * (x.ndim - 1))).to(x.dtype) * pattern


def test_samg_in_the_loop_records_bounded_maps_and_equals_cfg_at_equal_bounds():
    x_t = torch.randn(2, 3, 4, 5, 6, generator=torch.Generator().manual_seed(0))  # (b, f, c, h, w)
    run = {"prediction": "edm", "layout": "b f c h w", "sampler": "euler", "steps": 4, "progress": False}
    branches = {"cond": torch.ones(2), "uncond": torch.zeros(2)}
    records = []
    out = gk.sample(
        _toy_x0_model, x_t, strategy=gk.SAMG(w=3), callback=records.append, record_scale_maps=True, **run, **branches
    )
    assert out.shape == x_t.shape and torch.isfinite(out).all()
    for rec in records:
        assert rec.scale_map.shape == (2, 1, 3, 5, 6)  # one scale per (frame, h, w) point
        assert 2.0 <= rec.scale_min <= rec.scale_max <= float(torch.tensor(4.8))  # float32 maps
    cfg = gk.sample(_toy_x0_model, x_t, strategy=gk.CFG(3), **run, **branches)
    same = gk.sample(_toy_x0_model, x_t, strategy=gk.SAMG(w_min=3, w_max=3), **run, **branches)
    assert torch.equal(same, cfg)
    assert not torch.allclose(out, cfg)
