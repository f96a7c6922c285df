"""Per-strategy invariants of CFG, APG, Rescale and Interval (methods.md §11), as property tests."""

from __future__ import annotations

import math

import pytest
import torch
from gen import examples, make_pair, sigmas
from hypothesis import given, settings
from hypothesis import strategies as st

import guidekit as gk
from guidekit.errors import ConfigError, ShapeError
from guidekit.ops.guidance import apg, apg_from_delta, cfg, rescale_std
from guidekit.strategies.apg import MomentumState

Ctx = gk.GuidanceContext


def ctx_at(sigma: float | list[float], batch: int, **kw: object) -> Ctx:
    values = sigma if isinstance(sigma, list) else [sigma] * batch
    return Ctx(sigma=torch.tensor(values, dtype=torch.float32), **kw)  # type: ignore[arg-type]


def sequence(n: int, shape: tuple[int, ...] = (2, 3, 4, 5), seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [make_pair(shape, "correlated", seed + i) for i in range(n)]


# -- CFG ------------------------------------------------------------------------------------------------
@given(ex=examples(), w=st.floats(-2, 20))
def test_cfg_strategy_is_the_function_and_scale_one_skips_uncond(ex, w):
    c, u, ctx = ex.pred_cond, ex.pred_uncond, ex.context()
    assert torch.equal(gk.CFG(w)(c, u, ctx), cfg(c, u, w) if w != 1 else c)
    assert gk.CFG(w).needs_uncond(ctx) == (w != 1)
    assert gk.CFG(1.0)(c, u, ctx) is c


@given(ex=examples(), w=st.floats(0, 15), sigma=sigmas())
def test_cfg_gives_the_same_guided_x0_in_eps_and_x0_space(ex, w, sigma):
    """The linearity lemma (methods.md §2): EDM x0 = x - sigma * eps commutes with CFG."""
    x, eps_c, eps_u = ex.pred_cond, ex.pred_uncond, ex.pred_cond * 0.5 - ex.pred_uncond
    to_x0 = lambda eps: x - sigma * eps  # noqa: E731
    guided_eps = gk.CFG(w)(eps_c, eps_u, ex.context())
    guided_x0 = gk.CFG(w)(to_x0(eps_c), to_x0(eps_u), ex.context())
    assert torch.allclose(to_x0(guided_eps), guided_x0, rtol=1e-9, atol=1e-9 * (1 + w) * (1 + sigma))


def test_cfg_rejects_non_finite_scale():
    with pytest.raises(ConfigError, match="scale: expected a finite number, got nan"):
        gk.CFG(float("nan"))


# -- APG ------------------------------------------------------------------------------------------------
def test_apg_defaults_are_the_papers_sdxl_row_in_x0_space():
    s = gk.APG()
    assert (s.scale, s.eta, s.norm_threshold, s.momentum) == (15.0, 0.0, 15.0, -0.5)
    assert s.space == "x0"


@given(ex=examples(), momentum=st.floats(-0.9, 0.9))
def test_apg_first_call_equals_apg_without_momentum(ex, momentum):
    c, u, ctx = ex.pred_cond, ex.pred_uncond, ex.context()
    s = gk.APG(scale=6.0, eta=0.25, norm_threshold=4.0, momentum=momentum)
    expected = apg(c, u, 6.0, 0.25, 4.0)
    assert torch.allclose(s(c, u, ctx), expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))
    assert torch.allclose(s.step(c, u, ctx, s.init_state(c))[0], expected, rtol=1e-12, atol=1e-12)


def test_apg_momentum_zero_is_stateless():
    s = gk.APG(momentum=0.0)
    c, u = make_pair((2, 3, 4, 4), seed=1)
    assert s.init_state(c) is None
    out, state = s.step(c, u, ctx_at(1.0, 2), None)
    assert state is None and torch.equal(out, s(c, u, ctx_at(1.0, 2)))


@settings(max_examples=20)
@given(beta=st.floats(-0.9, 0.9).filter(lambda b: b != 0), steps=st.integers(1, 5), seed=st.integers(0, 1000))
def test_apg_momentum_follows_the_papers_recurrence(beta, steps, seed):
    s = gk.APG(scale=5.0, eta=0.1, norm_threshold=3.0, momentum=beta)
    pairs = sequence(steps, seed=seed)
    state, running = s.init_state(pairs[0][0]), torch.zeros_like(pairs[0][0])
    for i, (c, u) in enumerate(pairs):
        out, state = s.step(c, u, ctx_at(1.0, 2, step=i), state)
        running = (c - u) + beta * running
        assert torch.allclose(out, apg_from_delta(c, running, 5.0, 0.1, 3.0), rtol=1e-12, atol=1e-12)
        assert torch.allclose(state.running, running, rtol=1e-12, atol=1e-14)


def test_apg_corrector_reuses_the_steps_buffer_without_advancing():
    s = gk.APG(scale=5.0, momentum=-0.5)
    (c0, u0), (c1, u1), (c2, u2) = sequence(3)
    state = s.init_state(c0)
    _, state = s.step(c0, u0, ctx_at(2.0, 2, step=0), state)
    _, after_predictor = s.step(c1, u1, ctx_at(1.0, 2, step=1), state)
    out, after_corrector = s.step(c2, u2, ctx_at(0.5, 2, step=1, substep=1), after_predictor)
    assert after_corrector is after_predictor
    # the corrector combines its own Δ with the buffer step 1 started from (not the one it produced)
    assert torch.allclose(out, apg_from_delta(c2, (c2 - u2) - 0.5 * state.running, 5.0, 0.0, 15.0))


def test_apg_corrector_is_the_same_under_either_state_convention():
    """The guided loop hands a corrector the start-of-step state; a hand-written loop may hand it the
    predictor's. Both must combine with the buffer the step started from (a Heun bug otherwise)."""
    s = gk.APG(scale=5.0, momentum=-0.5)
    (c0, u0), (c1, u1), (c2, u2) = sequence(3)
    start = s.init_state(c0)
    _, start = s.step(c0, u0, ctx_at(2.0, 2, step=0), start)  # state at the start of step 1
    _, after_predictor = s.step(c1, u1, ctx_at(1.0, 2, step=1), start)
    corrector = ctx_at(0.5, 2, step=1, substep=1)
    from_start, _ = s.step(c2, u2, corrector, start)
    from_predictor, _ = s.step(c2, u2, corrector, after_predictor)
    assert torch.equal(from_start, from_predictor)
    assert torch.allclose(from_start, apg_from_delta(c2, (c2 - u2) - 0.5 * start.running, 5.0, 0.0, 15.0))


def test_apg_scale_one_needs_no_uncond_and_keeps_state():
    s = gk.APG(scale=1.0)
    c, u = make_pair((2, 3, 4, 4), seed=2)
    state = s.init_state(c)
    out, new_state = s.step(c, u, ctx_at(1.0, 2), state)
    assert out is c and new_state is state and not s.needs_uncond(ctx_at(1.0, 2))


def test_apg_state_is_float32_for_half_inputs():
    c = torch.zeros(1, 2, 3, 3, dtype=torch.bfloat16)
    state = gk.APG().init_state(c)
    assert isinstance(state, MomentumState) and state.running.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scale": float("inf")}, "scale"),
        ({"eta": float("nan")}, "eta"),
        ({"norm_threshold": -1.0}, "norm_threshold"),
        ({"momentum": "high"}, "momentum"),
    ],
)
def test_apg_rejects_bad_parameters_naming_them(kwargs, field):
    with pytest.raises(ConfigError, match=rf"^{field}: expected .*, got"):
        gk.APG(**kwargs)


def test_apg_threshold_scales_with_sqrt_numel():
    assert gk.APG.threshold_for(15.0, 4 * 128 * 128) == 15.0
    assert gk.APG.threshold_for(15.0, 4 * 64 * 64) == pytest.approx(7.5)
    assert gk.APG.threshold_for(15.0, 16 * 13 * 60 * 90) == pytest.approx(15.0 * math.sqrt(16 * 13 * 60 * 90 / 65536))
    with pytest.raises(ConfigError, match="numel"):
        gk.APG.threshold_for(15.0, 0)


# -- Rescale --------------------------------------------------------------------------------------------
@given(ex=examples(), w=st.floats(1.5, 12), phi=st.floats(0, 1))
def test_rescale_wraps_the_inner_strategy(ex, w, phi):
    c, u, ctx = ex.pred_cond, ex.pred_uncond, ex.context()
    out = gk.Rescale(gk.CFG(w), phi)(c, u, ctx)
    assert torch.equal(out, rescale_std(cfg(c, u, w), c, phi))
    assert torch.equal(gk.Rescale(gk.CFG(w), 0.0)(c, u, ctx), cfg(c, u, w))


@given(ex=examples(), phi=st.floats(0, 1))
def test_rescale_of_scale_one_is_pred_cond_and_needs_no_uncond(ex, phi):
    s = gk.Rescale(gk.CFG(1.0), phi)
    assert s(ex.pred_cond, ex.pred_uncond, ex.context()) is ex.pred_cond
    assert not s.needs_uncond(ex.context())


def test_rescale_passes_the_inner_state_through():
    inner = gk.APG(scale=4.0, momentum=-0.5)
    s = gk.Rescale(inner, 0.6)
    pairs = sequence(3)
    st_outer, st_inner = s.init_state(pairs[0][0]), inner.init_state(pairs[0][0])
    for i, (c, u) in enumerate(pairs):
        out, st_outer = s.step(c, u, ctx_at(1.0, 2, step=i), st_outer)
        ref, st_inner = inner.step(c, u, ctx_at(1.0, 2, step=i), st_inner)
        assert torch.equal(out, rescale_std(ref, c, 0.6))
        assert torch.equal(st_outer.running, st_inner.running)


def test_rescale_space_follows_inner_and_linear_inner_means_native():
    assert gk.Rescale(gk.CFG()).space == "native"
    assert gk.Rescale(gk.APG()).space == "x0"
    assert gk.Interval(gk.Rescale(gk.APG())).space == "x0"


@pytest.mark.parametrize(("kwargs", "match"), [({"phi": 1.5}, "phi: expected a number in"), ({"inner": 3}, "inner")])
def test_rescale_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        gk.Rescale(**kwargs)


# -- Interval -------------------------------------------------------------------------------------------
bounds = st.tuples(st.floats(0.0, 10.0), st.one_of(st.none(), st.floats(0.0, 20.0))).filter(
    lambda b: b[1] is None or b[1] >= b[0]
)


@given(ex=examples(), lo_hi=bounds)
def test_interval_is_inner_inside_and_pred_cond_outside_per_sample(ex, lo_hi):
    lo, hi = lo_hi
    c, u, ctx = ex.pred_cond, ex.pred_uncond, ex.context()
    inner = gk.CFG(3.0)
    s = gk.Interval(inner, lo, hi)
    out = s(c, u, ctx)
    guided = inner(c, u, ctx)
    sig = ex.sigma.double()
    inside = (sig > lo) & (sig <= (math.inf if hi is None else hi))
    for i in range(c.shape[0]):
        assert torch.equal(out[i], guided[i] if inside[i] else c[i])
    assert s.needs_uncond(ctx) == bool(inside.any())
    if not bool(inside.any()):
        assert out is c  # bit-identical: the conditional prediction itself
        assert torch.equal(s(c, u * 7 - 1, ctx), c)


@given(ex=examples())
def test_interval_covering_everything_is_the_inner_strategy(ex):
    c, u, ctx = ex.pred_cond, ex.pred_uncond, ex.context()
    assert torch.equal(gk.Interval(gk.APG(momentum=0), 0.0, None)(c, u, ctx), gk.APG(momentum=0)(c, u, ctx))


@given(ex=examples(), at=st.floats(0.0, 50.0))
def test_an_empty_interval_is_the_conditional_sampler(ex, at):
    s = gk.Interval(gk.CFG(5.0), at, at)
    assert s(ex.pred_cond, ex.pred_uncond, ex.context()) is ex.pred_cond
    assert not s.needs_uncond(ex.context())


def test_interval_bounds_exclude_lo_and_include_hi():
    s = gk.Interval(gk.CFG(2.0), sigma_lo=0.5, sigma_hi=2.0)
    assert s.inside(ctx_at([0.5, 0.50001, 2.0, 2.00001], 4)).tolist() == [False, True, True, False]


@given(lo_hi=bounds)
def test_interval_scale_map_is_one_outside_and_inner_inside(lo_hi):
    lo, hi = lo_hi
    s = gk.Interval(gk.CFG(4.0), lo, hi)
    c, u = make_pair((4, 2, 3, 3))
    ctx = ctx_at([0.1, 1.0, 5.0, 15.0], 4)
    expected = torch.where(s.inside(ctx), 4.0, 1.0).double()
    assert torch.equal(s.scale_map(c, u, ctx).flatten(), expected)


@settings(max_examples=30)
@given(
    num_steps=st.integers(1, 60),
    start_stop=st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted),
    rho=st.floats(1.0, 9.0),
)
def test_from_fractions_guides_exactly_diffusers_step_window(num_steps, start_stop, rho):
    start, stop = start_stop
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    karras = (80 ** (1 / rho) + ramp * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    schedule = torch.cat([karras, torch.zeros(1, dtype=torch.float64)]).to(torch.float32)
    s = gk.Interval.from_fractions(gk.CFG(2.0), start, stop, schedule)
    guided = [i for i in range(num_steps) if bool(s.inside(ctx_at(float(schedule[i]), 1)))]
    assert guided == [i for i in range(num_steps) if int(start * num_steps) <= i < int(stop * num_steps)]


def test_from_fractions_accepts_a_flow_schedule_starting_at_infinity():
    schedule = torch.tensor([math.inf, 3.0, 1.0, 1 / 3, 0.0])
    s = gk.Interval.from_fractions(gk.CFG(2.0), 0.0, 0.5, schedule)
    assert (s.sigma_lo, s.sigma_hi) == (1.0, None)
    assert s.inside(ctx_at([math.inf, 3.0, 1.0], 3)).tolist() == [True, True, False]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0.5, 0.2, [3.0, 1.0, 0.0]), "stop: expected a fraction >= start"),
        ((-0.1, 0.2, [3.0, 1.0, 0.0]), "start: expected a fraction in"),
        ((0.0, 1.0, [3.0, 3.0, 0.0]), "sigmas: expected strictly decreasing"),
        ((0.0, 1.0, [3.0]), "sigmas: expected a 1D schedule"),
    ],
)
def test_from_fractions_rejects_bad_input(args, match):
    with pytest.raises(ConfigError, match=match):
        gk.Interval.from_fractions(gk.CFG(), *args)


@given(t=st.tuples(st.floats(0, 0.999), st.floats(0, 1)).map(sorted), probe=st.floats(0, 0.999))
def test_flow_times_round_trip_and_give_the_same_rule(t, probe):
    t_lo, t_hi = t
    s = gk.Interval.from_flow_times(gk.CFG(2.0), t_lo, t_hi)
    back = s.flow_times
    assert back[0] == pytest.approx(t_lo, abs=1e-12) and back[1] == pytest.approx(t_hi, abs=1e-12)
    sigma = probe / (1 - probe)
    inside = bool(s.inside(Ctx(sigma=torch.tensor([sigma], dtype=torch.float64))))
    assert inside == (s.sigma_lo < sigma and (s.sigma_hi is None or sigma <= s.sigma_hi))
    if abs(probe - t_lo) > 1e-9 and abs(probe - t_hi) > 1e-9:
        assert inside == (t_lo < probe <= t_hi)


def test_default_interval_in_flow_time():
    assert gk.Interval().flow_times == pytest.approx((0.28 / 1.28, 5.42 / 6.42))
    assert gk.Interval.from_flow_times(gk.CFG(), 0.2, 1.0).sigma_hi is None


def test_corrector_evaluations_follow_their_steps_choice():
    schedule = torch.tensor([8.0, 5.0, 2.0, 0.2, 0.0])
    s = gk.Interval(gk.CFG(3.0), sigma_lo=1.0, sigma_hi=5.0)
    c, u = make_pair((1, 2, 3, 3))
    # step 0 starts at 8 (outside): its corrector at sigma 5 (inside) stays unguided
    ctx = ctx_at(5.0, 1, step=0, substep=1, sigmas=schedule)
    assert not s.needs_uncond(ctx) and s(c, u, ctx) is c
    # step 2 starts at 2 (inside): its corrector at sigma 0.2 (outside) is still guided
    ctx = ctx_at(0.2, 1, step=2, substep=1, sigmas=schedule)
    assert s.needs_uncond(ctx) and torch.equal(s(c, u, ctx), cfg(c, u, 3.0))
    # without a schedule the evaluation's own sigma decides
    assert not s.needs_uncond(ctx_at(0.2, 1, step=2, substep=1))


def test_interval_inner_state_advances_only_on_guided_steps():
    inner = gk.APG(scale=4.0, momentum=-0.5)
    s = gk.Interval(inner, sigma_lo=1.0, sigma_hi=10.0)
    sig = [20.0, 8.0, 5.0, 0.5, 3.0]
    pairs = sequence(len(sig))
    state, inner_state = s.init_state(pairs[0][0]), inner.init_state(pairs[0][0])
    for i, ((c, u), sigma) in enumerate(zip(pairs, sig, strict=True)):
        out, new_state = s.step(c, u, ctx_at(sigma, 2, step=i), state)
        if 1.0 < sigma <= 10.0:
            ref, inner_state = inner.step(c, u, ctx_at(sigma, 2, step=i), inner_state)
            assert torch.equal(out, ref)
            assert torch.equal(new_state.running, inner_state.running)
        else:
            assert out is c and new_state is state
        state = new_state


def test_interval_mixed_batch_equals_running_each_sample_alone():
    s = gk.Interval(gk.APG(scale=4.0, momentum=-0.5), sigma_lo=1.0, sigma_hi=10.0)
    sig = [[20.0, 5.0], [8.0, 0.5], [5.0, 3.0], [0.5, 9.0]]
    pairs = sequence(len(sig))
    state = s.init_state(pairs[0][0])
    alone = [s.init_state(pairs[0][0][i : i + 1]) for i in range(2)]
    for step, ((c, u), sigma) in enumerate(zip(pairs, sig, strict=True)):
        out, state = s.step(c, u, ctx_at(sigma, 2, step=step), state)
        for i in range(2):
            ref, alone[i] = s.step(c[i : i + 1], u[i : i + 1], ctx_at(sigma[i], 1, step=step), alone[i])
            assert torch.allclose(out[i : i + 1], ref, rtol=1e-12, atol=1e-12)
            assert torch.allclose(state.running[i : i + 1], alone[i].running, rtol=1e-12, atol=1e-14)


def test_interval_delegates_needs_uncond_and_space_to_inner():
    ctx = ctx_at(2.0, 2)
    assert not gk.Interval(gk.CFG(1.0)).needs_uncond(ctx)
    assert gk.Interval(gk.CFG(2.0)).needs_uncond(ctx)
    assert gk.Interval(gk.APG()).space == "x0" and gk.Interval().space == "any"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma_lo": -1.0}, "sigma_lo: expected a finite number >= 0, got -1.0"),
        ({"sigma_lo": 3.0, "sigma_hi": 1.0}, r"sigma_hi: expected a finite number >= sigma_lo \(3.0\)"),
        ({"sigma_hi": math.inf}, "or None for no bound, got inf"),
        ({"inner": "cfg"}, "inner: expected a GuidanceStrategy, got str"),
    ],
)
def test_interval_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        gk.Interval(**kwargs)


def test_interval_rejects_a_sigma_per_sample_of_the_wrong_length():
    c, u = make_pair((3, 2, 4, 4))
    with pytest.raises(ShapeError, match=r"ctx\.sigma: expected 3 values"):
        gk.Interval()(c, u, ctx_at([1.0, 2.0], 2))
