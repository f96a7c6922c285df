"""CFG-Zero* (``gk.CFGZeroStar``): diffusers 0.42.1 ``ClassifierFreeZeroStarGuidance``, the unscaled-shift
variant, the invariants and zero-init steps (methods.md §11), parameter errors; through the guided loop on
the Gaussian-mixture oracle, zero-init steps call no network and leave a flow sample where it is."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loop_helpers import GM, LABELS, UNCONDS, x_T
from strategy_helpers import close, ctx_for, flat, pairs
from torch import Tensor

import guidekit as gk
from guidekit.ops.guidance import cfg_zero_star, cfg_zero_star_scale
from guidekit.ops.spaces import flow_x


@settings(max_examples=30)
@given(pairs(dtype=torch.float32), st.floats(0.0, 12.0), st.integers(0, 3), st.integers(0, 4))
def test_cfg_zero_star_matches_diffusers(pair, w, zero_init_steps, step):
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    c, u = pair
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=zero_init_steps)
    guider.set_state(step=step, num_inference_steps=10, timestep=torch.tensor(500))
    ref = guider.forward(c.double(), u.double()).pred.float()  # float64 dots: no float32 cancellation in s*
    ctx = ctx_for(c, step=step, num_steps=10, space="flow")
    out = gk.CFGZeroStar(w, zero_init_steps=zero_init_steps)(c, u, ctx)
    # the same rule; diffusers divides by ||u||^2 + 1e-8 where we guard ||u|| = 0. Its float32 dots lose s* to
    # cancellation when c is nearly orthogonal to u (ours are float64), so it is run on float64 inputs. The
    # output itself may cancel (c close to s*u): its float32 rounding is measured against the inputs' scale
    uu = float(flat(u).pow(2).sum(1).min())
    if uu > 1e-2:
        assert close(out, ref, 1e-5 + 1e-7 / uu, like=(1 + w) * (c.abs() + u.abs()))


@given(pairs(), st.floats(0.0, 12.0))
def test_cfg_zero_star_unscaled_shift_variant(pair, w):
    c, u = pair
    s = cfg_zero_star_scale(c, u).reshape(-1, *[1] * (c.ndim - 1))
    like = (1 + w) * (c.abs() + s.abs() * u.abs())
    assert close(cfg_zero_star(c, u, w, scaled_shift=False), s * u + w * (c - u), 1e-9, like)
    assert close(cfg_zero_star(c, u, w), s * u + w * (c - s * u), 1e-9, like)


@given(pairs(kinds=("independent", "correlated", "offset")), st.floats(-5.0, 12.0), st.floats(0.1, 10.0))
def test_cfg_zero_star_invariants(pair, w, a):
    c, u = pair
    ctx = ctx_for(c, step=3, num_steps=10)
    assert torch.equal(gk.CFGZeroStar(1.0)(c, u, ctx), c)
    for sign in (1.0, -1.0):  # u = a c: s* = 1/a, s* u = c, so the output is c for any w
        assert close(gk.CFGZeroStar(w)(c, sign * a * c, ctx), c, 1e-9, like=(1 + abs(w)) * a * c)
    # s* is scale-covariant in c
    assert close(cfg_zero_star_scale(a * c, u), a * cfg_zero_star_scale(c, u), 1e-9)


@given(pairs(), st.integers(1, 4))
def test_cfg_zero_star_zero_init_steps(pair, zero_init_steps):
    c, u = pair
    s = gk.CFGZeroStar(5.0, zero_init_steps=zero_init_steps)
    for step in range(zero_init_steps + 2):
        ctx = ctx_for(c, step=step, num_steps=10, space="flow")
        out = s(c, u, ctx)
        if step < zero_init_steps:
            assert s.branches(ctx, None) == () and not s.needs_uncond(ctx)  # the empty plan: no network
            assert torch.equal(out, torch.zeros_like(c))  # v = 0: the flow sample does not move
        else:
            assert s.branches(ctx, None) != ()
            assert close(out, cfg_zero_star(c, u, 5.0), 1e-12)


@pytest.mark.parametrize("space", ["eps", "v", "x0"])
def test_cfg_zero_star_zero_init_is_for_flow_velocities(space):
    c = torch.randn(2, 3, 4, 4)
    with pytest.raises(gk.ConfigError, match=rf"zero_init_steps: expected 0 for '{space}' predictions .* got 1"):
        gk.CFGZeroStar()(c, c, ctx_for(c, space=space))
    assert torch.equal(gk.CFGZeroStar(zero_init_steps=0)(c, c, ctx_for(c, space=space)), c)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: gk.CFGZeroStar(zero_init_steps=-1), r"zero_init_steps: expected an integer >= 0, got -1"),
        (lambda: gk.CFGZeroStar(zero_init_steps=1.5), r"zero_init_steps: expected an integer >= 0, got 1\.5"),
        (lambda: gk.CFGZeroStar(scaled_shift=1), r"scaled_shift: expected True or False, got 1"),
    ],
)
def test_bad_parameters_are_named(build, match):
    with pytest.raises(gk.ConfigError, match=match):
        build()


# -- through the guided loop --------------------------------------------------------------------------------
@pytest.mark.parametrize("zero_init_steps", [0, 1, 3])
def test_cfg_zero_star_zero_init_skips_the_network_and_keeps_the_flow_sample(zero_init_steps):
    calls = []
    flow_model = GM.as_model("flow")

    def counted(x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        calls.append(x.shape[0])
        return flow_model(x, t, labels)

    steps = 6
    adapter = gk.samplers.adapt(counted, "flow")
    den = gk.guided(adapter, gk.CFGZeroStar(4.0, zero_init_steps=zero_init_steps), LABELS, UNCONDS)
    sigmas = gk.samplers.flow_sigmas(steps)
    start = adapter.initial_x(x_T(2), sigmas[0])
    seen = []
    gk.samplers.sample_flow_euler(den, start, sigmas, callback=lambda s: seen.append(s))
    assert len(calls) == steps - zero_init_steps and den.nfe == 2 * (steps - zero_init_steps)
    for rec in den.records:
        assert rec.model_called == (rec.step >= zero_init_steps)
    for s in seen[:zero_init_steps]:  # velocity 0: the flow sample x_t does not move
        assert torch.allclose(flow_x(s.x, torch.tensor([s.sigma_next]).double()), x_T(2), rtol=0, atol=1e-12)
