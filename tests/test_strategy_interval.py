"""Interval guidance (``gk.Interval``): methods.md §11 invariants as property tests (inner strategy inside
the sigma window, the conditional prediction outside, per sample), ``from_fractions`` / ``from_flow_times``,
correctors following their step, inner state, parameter errors; through the loop, an Interval forwards its
inner strategy's zero-init skips.

The engine defect it pins (each test failed on the code before the fix): Interval windows moved with the
dtype: float32 sigmas rounded across ``from_fractions`` edges, and the same schedule value was inside in
float64 and outside in float32 (also predictor vs corrector under churn).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from gen import examples, make_pair
from hypothesis import given, settings
from hypothesis import strategies as st
from loop_helpers import GM, LABELS, UNCONDS, x_T
from strategy_helpers import ctx_at, sequence
from torch import Tensor

import guidekit as gk
from guidekit.errors import ConfigError, ShapeError
from guidekit.ops.guidance import cfg
from guidekit.ops.timesteps import karras_sigmas
from guidekit.samplers import EDMModel, sample_heun

Ctx = gk.GuidanceContext


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


def test_interval_forwards_zero_init_skips():
    calls = []
    flow_model = GM.as_model("flow")

    def counted(x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        calls.append(x.shape[0])
        return flow_model(x, t, labels)

    adapter = gk.samplers.adapt(counted, "flow")
    strategy = gk.Interval(gk.CFGZeroStar(4.0, zero_init_steps=2), 0.0, None)
    den = gk.guided(adapter, strategy, LABELS, UNCONDS)
    sigmas = gk.samplers.flow_sigmas(6)
    gk.samplers.sample_flow_euler(den, adapter.initial_x(x_T(2), sigmas[0]), sigmas)
    assert len(calls) == 4 and [r.model_called for r in den.records] == [False, False, True, True, True, True]


# -- engine defect: Interval windows moved with the dtype; one window in every dtype, on every sampler -----
def guided_steps(strategy: gk.GuidanceStrategy, dtype: torch.dtype, sampler: str, sigmas: Tensor, **options: Any):
    """The steps whose evaluations ran the unconditional branch, from the step records."""
    records: list[gk.StepRecord] = []
    gk.sample(
        GM.as_model("edm"),
        x_T(dtype=dtype),
        prediction="edm",
        sampler=sampler,
        schedule=sigmas,
        strategy=strategy,
        cond=LABELS,
        uncond=UNCONDS,
        progress=False,
        callback=records.append,
        sampler_options=options or None,
    )
    return [r.step for r in records if r.uncond_used]


@dataclass(frozen=True)
class Decisions(gk.Combinator):
    """Logs, per evaluation, (step, substep, guided?) of an Interval it wraps."""

    inner: gk.Interval = gk.Interval()  # noqa: RUF009
    log: list = None  # type: ignore[assignment]

    def combine_branches(self, preds, ctx, state):
        self.log.append((ctx.step, ctx.substep, bool(self.inner.inside(ctx).all())))
        return self.inner.combine_branches(preds, ctx, state)


@pytest.mark.parametrize("sampler", ["euler", "ddim", "heun", "dpmpp-2m", "euler-ancestral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_from_fractions_guides_the_same_steps_in_float32_and_float64(sampler, dtype):
    """Engine defect: float32 sigmas rounded across ``from_fractions`` edges, so the window moved with the
    dtype (pinned on every sampler)."""
    sigmas = karras_sigmas(10, 0.002, 80.0)
    strategy = gk.Interval.from_fractions(gk.CFG(3.0), 0.2, 0.6, sigmas)
    assert guided_steps(strategy, dtype, sampler, sigmas) == [2, 3, 4, 5]  # int(0.2*10) <= i < int(0.6*10)


def test_from_fractions_matches_the_fraction_rule_for_every_step_count_in_float32():
    """Engine defect: float32 sigmas rounded across ``from_fractions`` edges (pinned for 2-40 steps)."""
    for n in range(2, 41):
        sigmas = karras_sigmas(n, 0.002, 80.0)
        for start, stop in ((0.2, 0.6), (0.1, 0.9), (0.33, 0.5)):
            strategy = gk.Interval.from_fractions(gk.CFG(3.0), start, stop, sigmas)
            expected = list(range(int(start * n), int(stop * n)))
            assert guided_steps(strategy, torch.float32, "euler", sigmas) == expected, (n, start, stop)


def test_a_bound_at_a_float32_rounded_schedule_value_decides_the_same_in_both_dtypes():
    """Engine defect: the same schedule value was inside the window in float64 and outside in float32."""
    sigmas = karras_sigmas(10, 0.002, 80.0)
    k = next(i for i in range(1, 10) if float(sigmas[i].float()) < float(sigmas[i]))  # rounds down in float32
    lo = float(sigmas[k].float())  # sigma_k > lo in float64; float32(sigma_k) == lo
    for dtype in (torch.float32, torch.float64):
        steps = guided_steps(gk.Interval(gk.CFG(3.0), sigma_lo=lo, sigma_hi=None), dtype, "euler", sigmas)
        assert steps == list(range(k + 1)), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_predictor_and_corrector_agree_with_churn(dtype):
    """Engine defect: under churn, a step's predictor and corrector decided the window differently."""
    sigmas = karras_sigmas(8, 0.002, 80.0)
    interval = gk.Interval(gk.CFG(3.0), sigma_lo=float(sigmas[5]), sigma_hi=float(sigmas[2]))
    spy = Decisions(interval, [])
    model = EDMModel(GM.as_model("edm"))
    den = gk.guided(model, spy, LABELS, UNCONDS)
    sample_heun(den, model.initial_x(x_T(dtype=dtype), sigmas[0]), sigmas, s_churn=4.0, generator=torch.Generator())
    by_step: dict[int, set[bool]] = {}
    for step, _, inside in spy.log:
        by_step.setdefault(step, set()).add(inside)
    assert all(len(v) == 1 for v in by_step.values()), by_step  # one decision per step
    assert [s for s, v in sorted(by_step.items()) if True in v] == [2, 3, 4]
