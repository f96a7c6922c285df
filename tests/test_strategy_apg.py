"""APG (``gk.APG``): methods.md §11 invariants as property tests: the paper's defaults and momentum
recurrence, the corrector's use of the step's buffer, float32 state, parameter errors, the threshold rule."""

from __future__ import annotations

import math

import pytest
import torch
from gen import examples, make_pair
from hypothesis import given, settings
from hypothesis import strategies as st
from strategy_helpers import ctx_at, sequence

import guidekit as gk
from guidekit.errors import ConfigError
from guidekit.ops.guidance import apg, apg_from_delta
from guidekit.strategies.apg import MomentumState


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
