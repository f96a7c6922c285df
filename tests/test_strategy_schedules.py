"""Schedule combinators (TV-CFG, Ramp, DynamicCFG, ScaleFunction/ScaleCallable): methods.md §11 invariants,
the official TV-CFG table (sqt24/tvcfg ``guidance_schedulers.py``, restated in numpy) and diffusers'
CogVideoX formula on its own scheduler's timesteps."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import guidekit as gk
from guidekit.ops.schedules import cogvideox_dynamic_scale, ramp_scale, sigma_bump, tvcfg_scales
from guidekit.ops.spaces import flow_t_from_sigma
from guidekit.ops.timesteps import trailing_timestep
from guidekit.testing import make_pair


def ctx(n_samples: int = 2, step: int = 0, num_steps: int = 10, sigma: object = 1.0, **kw) -> gk.GuidanceContext:
    s = torch.as_tensor(sigma, dtype=torch.float32).expand(n_samples).clone()
    return gk.GuidanceContext(sigma=s, step=step, num_steps=num_steps, **kw)


PAIR = make_pair((2, 3, 4, 5), "correlated", seed=0)


@st.composite
def decreasing_times(draw, max_steps: int = 60):
    """``N + 1`` step times ``t_0 > ... > t_{N-1} > t_N = 0`` (any positive scale)."""
    n = draw(st.integers(1, max_steps))
    gaps = draw(st.lists(st.floats(1e-3, 1.0), min_size=n, max_size=n))
    t = np.concatenate([np.cumsum(gaps[::-1])[::-1], [0.0]]) * draw(st.floats(0.1, 1000.0))
    return torch.tensor(t, dtype=torch.float64)


# -- TV-CFG --------------------------------------------------------------------------------------------------
def tvcfg_official(timesteps: np.ndarray, mean: float) -> np.ndarray:
    """``GuidanceSchedulers(timesteps, mean).symmetric(1, 2 mean - 1)`` of the official code, restated."""
    n = len(timesteps)
    t = timesteps / timesteps.max()
    dt = t - np.concatenate([t[1:], [0.0]])
    low, high, half = 1.0, 2 * mean - 1.0, n // 2
    if n % 2 == 0:
        tri = np.concatenate([np.linspace(low, high, half, endpoint=False), np.linspace(high, low, half)])
    else:
        tri = np.concatenate([np.linspace(low, high, half + 1), np.linspace(high, low, half + 1)[1:]])
    return tri * mean / np.sum(tri * dt)


@given(decreasing_times(), st.floats(0.5, 15.0))
def test_tvcfg_table_matches_the_official_schedule(times, mean):
    ours = tvcfg_scales(mean, times).numpy()
    np.testing.assert_allclose(ours, tvcfg_official(times[:-1].numpy(), mean), rtol=1e-12)


@given(decreasing_times(), st.floats(1.0, 15.0))
def test_tvcfg_invariants(times, mean):
    w = tvcfg_scales(mean, times)
    t = times / times[0]
    dt = t[:-1] - t[1:]
    n = w.numel()
    assert math.isclose(float((w * dt).sum()), mean, rel_tol=1e-12)  # time-weighted mean
    if n != 2:  # the official N = 2 table is [low, high] (numpy's linspace(high, low, 1) == [high])
        assert math.isclose(float(w[0]), float(w[-1]), rel_tol=1e-12)  # equal ends
    peak = n // 2
    assert float(w[peak]) == pytest.approx(float(w.max()), rel=1e-12)  # unimodal, peak at floor(N/2)
    assert bool((torch.diff(w[: peak + 1]) >= -1e-12).all()) and bool((torch.diff(w[peak:]) <= 1e-12).all())
    ones = tvcfg_scales(1.0, times)
    assert torch.allclose(ones, torch.ones_like(ones), rtol=0, atol=1e-12)  # w̄ = 1: no guidance


@settings(max_examples=30)
@given(st.integers(1, 25), st.floats(1.0, 9.0), st.sampled_from(("flow", "steps")))
def test_tvcfg_strategy_runs_the_inner_strategy_at_the_tables_scale(n, mean, time):
    sigmas = gk.samplers.karras_sigmas(n, 0.002, 80.0)
    strategy = gk.TVCFG(gk.CFG(mean), time=time)
    table = tvcfg_scales(
        mean, flow_t_from_sigma(sigmas) if time == "flow" else torch.linspace(1, 0, n + 1, dtype=torch.float64)
    )
    c, u = PAIR
    for i in range(n):
        cx = ctx(step=i, num_steps=n, sigma=float(sigmas[i]), sigmas=sigmas)
        assert torch.allclose(strategy(c, u, cx), gk.CFG(float(table[i]))(c, u, cx), rtol=1e-12, atol=0)
        assert strategy.needs_uncond(cx) == (float(table[i]) != 1.0)


def test_tvcfg_keeps_the_inner_state_and_errors_name_what_is_missing():
    c, u = PAIR
    sigmas = gk.samplers.karras_sigmas(4, 0.002, 80.0)
    apg = gk.APG(scale=5.0, momentum=-0.5)
    tv = gk.TVCFG(apg)
    state_tv, state_apg = tv.init_state(c), apg.init_state(c)
    for i in range(4):
        cx = ctx(step=i, num_steps=4, sigma=float(sigmas[i]), sigmas=sigmas)
        w = float(tv.scale_at(cx)[0])
        out_tv, state_tv = tv.step(c, u, cx, state_tv)
        out_apg, state_apg = gk.APG(scale=w, momentum=-0.5).step(c, u, cx, state_apg)
        assert torch.equal(out_tv, out_apg)
    with pytest.raises(gk.ConfigError, match=r"ctx\.sigmas: expected the run's sigma schedule of num_steps \+ 1 = 11"):
        gk.TVCFG()(c, u, ctx())
    with pytest.raises(gk.ConfigError, match=r"ctx\.step: expected 0 <= step < num_steps = 4, got 4"):
        gk.TVCFG(time="steps")(c, u, ctx(step=4, num_steps=4))
    with pytest.raises(gk.ConfigError, match=r"inner: expected a strategy with a `scale` parameter .* got SAMG"):
        gk.TVCFG(gk.SAMG())
    with pytest.raises(gk.ConfigError, match=r"time: expected one of 'flow', 'steps', got 'sigma'"):
        gk.TVCFG(time="sigma")


# -- Ramp (Wang et al.) --------------------------------------------------------------------------------------
@given(st.integers(1, 80), st.floats(0.0, 15.0), st.sampled_from(("linear", "cosine")), st.sampled_from(("A", "B")))
def test_ramp_has_the_mean_scale_and_increases(n, mean, shape, reading):
    ramp = gk.Ramp(gk.CFG(mean), shape=shape, reading=reading)
    w = torch.cat([ramp.scale_at(ctx(step=i, num_steps=n)) for i in range(n)]).reshape(n, -1)[:, 0]
    assert math.isclose(float(w.mean()), mean, rel_tol=1e-12, abs_tol=1e-12)  # area normalisation
    slope = mean - 1.0 if reading == "A" else mean
    diffs = torch.diff(w) * (1 if slope >= 0 else -1)
    assert bool((diffs >= -1e-12).all())  # monotone in progress (increasing for w̄ > 1)
    for i, tau in enumerate((np.arange(n) + 0.5) / n):
        assert float(w[i]) == pytest.approx(ramp_scale(mean, float(tau), shape, reading), rel=1e-12)


@given(st.integers(1, 40), st.floats(1.0, 15.0), st.floats(0.0, 10.0))
def test_ramp_clamp_only_raises(n, mean, floor):
    plain, clamped = gk.Ramp(gk.CFG(mean)), gk.Ramp(gk.CFG(mean), min_scale=floor)
    for i in range(n):
        a, b = float(plain.scale_at(ctx(step=i, num_steps=n))[0]), float(clamped.scale_at(ctx(step=i, num_steps=n))[0])
        assert b == max(a, floor)


def test_ramp_at_mean_one_is_conditional_sampling():
    c, u = PAIR
    ramp = gk.Ramp(gk.CFG(1.0))
    for i in range(5):
        assert not ramp.needs_uncond(ctx(step=i, num_steps=5))
        assert torch.equal(ramp(c, u, ctx(step=i, num_steps=5)), c)


# -- CogVideoX dynamic CFG ------------------------------------------------------------------------------------
@settings(max_examples=20)
@given(st.integers(1, 100), st.floats(1.0, 12.0))
def test_dynamic_cfg_reproduces_the_cogvideox_pipeline(n, w):
    from diffusers import CogVideoXDDIMScheduler

    scheduler = CogVideoXDDIMScheduler(timestep_spacing="trailing")
    scheduler.set_timesteps(n)
    dynamic = gk.DynamicCFG(gk.CFG(w))
    for i, t in enumerate(scheduler.timesteps[:n]):
        assert trailing_timestep(i, n) == int(t)
        # pipeline_cogvideox.py, use_dynamic_cfg=True: t is the scheduler timestep
        expected = 1 + w * ((1 - math.cos(math.pi * ((n - t.item()) / n) ** 5.0)) / 2)
        assert float(dynamic.scale_at(ctx(step=i, num_steps=n))[0]) == pytest.approx(expected, rel=1e-12)


def test_trailing_timesteps_match_diffusers_for_every_step_count():
    from diffusers import CogVideoXDDIMScheduler

    scheduler = CogVideoXDDIMScheduler(timestep_spacing="trailing")
    for n in range(1, 151):
        scheduler.set_timesteps(n)
        # numpy's arange overshoots for some n (61, 103, 121, 122): diffusers then appends a timestep -1
        assert [trailing_timestep(i, n) for i in range(n)] == scheduler.timesteps.tolist()[:n]


@given(st.integers(2, 100), st.floats(0.0, 12.0), st.floats(1.0, 8.0))
def test_dynamic_cfg_step_reading_rises_from_one_to_one_plus_w(n, w, exponent):
    dynamic = gk.DynamicCFG(gk.CFG(w), exponent=exponent, position="step")
    scales = [float(dynamic.scale_at(ctx(step=i, num_steps=n))[0]) for i in range(n)]
    assert scales[0] == 1.0
    assert all(b >= a - 1e-12 for a, b in pairwise(scales))
    assert all(1.0 <= s <= 1.0 + w + 1e-12 for s in scales)
    assert scales == pytest.approx([cogvideox_dynamic_scale(w, i / n, exponent) for i in range(n)], rel=1e-12)


def test_dynamic_cfg_errors():
    with pytest.raises(gk.ConfigError, match=r"exponent: expected an integer for position='timestep'.*got 2\.5"):
        gk.DynamicCFG(exponent=2.5)
    with pytest.raises(gk.ConfigError, match=r"num_train_timesteps: expected a positive integer, got 0"):
        gk.DynamicCFG(num_train_timesteps=0)
    assert gk.DynamicCFG(exponent=2.5, position="step").exponent == 2.5


# -- ScaleFunction / ScaleCallable -------------------------------------------------------------------------
@given(st.lists(st.sampled_from((0.05, 0.5, 1.0, 3.0, 40.0)), min_size=1, max_size=4), st.integers(0, 99))
def test_scale_function_of_sigma_is_per_sample(sigmas, seed):
    c, u = make_pair((len(sigmas), 3, 4, 4), "correlated", seed)
    s = gk.ScaleFunction("guidekit.ops.schedules:sigma_bump")
    cx = ctx(len(sigmas), sigma=sigmas)
    out = s(c, u, cx)
    for i, sig in enumerate(torch.tensor(sigmas, dtype=torch.float32).tolist()):
        one = gk.CFG(sigma_bump(sig))(c[i : i + 1], u[i : i + 1])
        assert torch.allclose(out[i : i + 1], one, rtol=1e-12, atol=0)
    maps = s.scale_map(c, u, cx)
    assert maps.shape == (len(sigmas), 1, 1, 1)
    assert torch.allclose(
        maps.flatten().double(), torch.tensor([sigma_bump(x) for x in cx.sigma.tolist()], dtype=torch.float64)
    )


def test_scale_function_round_trips_and_matches_the_callable_form(scale_functions):
    scale_functions("cos", math.cos)
    s = gk.ScaleFunction("cos", gk.APG(scale=3.0), variable="progress")
    again = gk.build(gk.to_spec(s).model_dump_json())
    assert again == s
    c, u = PAIR
    same = gk.ScaleCallable(math.cos, gk.APG(scale=3.0), variable="progress")
    for i in range(4):
        cx = ctx(step=i, num_steps=4)
        assert torch.equal(again(c, u, cx), same(c, u, cx))
        assert torch.equal(same(c, u, cx), gk.APG(scale=math.cos(i / 4))(c, u, cx))
    with pytest.raises(gk.ConfigError, match=r"obj: expected a registered dataclass component, got ScaleCallable"):
        gk.to_spec(same)


def test_scale_function_errors_name_the_function(scale_functions):
    with pytest.raises(gk.ConfigError, match=r"function: expected a registered scale function .*, got 'no_such"):
        gk.ScaleFunction("no_such_module:f")
    with pytest.raises(gk.ConfigError, match=r"function: expected a registered scale function .*, got 'math:pi'"):
        gk.ScaleFunction("math:pi")
    scale_functions("log", math.log)
    c, u = PAIR
    with pytest.raises(gk.ConfigError, match=r"function: math\.log\(sigma=0\.0\) raised ValueError"):
        gk.ScaleFunction("math.log")(c, u, ctx(sigma=0.0))
    with pytest.raises(gk.ConfigError, match=r"function: expected <lambda>\(progress=0\.0\) to return a finite"):
        gk.ScaleCallable(lambda p: float("nan"), variable="progress")(c, u, ctx())
    with pytest.raises(gk.ConfigError, match=r"fn: expected a callable float -> float, got int"):
        gk.ScaleCallable(3)
    stateful = gk.ScaleCallable(lambda s: s, gk.APG(momentum=-0.5))
    with pytest.raises(gk.ConfigError, match=r"inner: expected a stateless strategy when samples get different"):
        stateful(c, u, ctx(sigma=[1.0, 2.0]))
