"""ADG, TCFG and CFG-Zero*: methods.md §11 invariants as properties, plus the official rules and diffusers.

References: jinc7461/ADG ``method/ADG_SD3.py`` (restated below for one sample, the only batch size it
handles), diffusers 0.42.1 ``TangentialClassifierFreeGuidance`` / ``ClassifierFreeZeroStarGuidance``, and
float64 SVDs for the tangential projection.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import guidekit as gk
from guidekit.ops.guidance import (
    adg,
    cfg_zero_star,
    cfg_zero_star_scale,
    per_sample_cosine,
    tangential_projection,
    tcfg,
)
from guidekit.testing import KINDS, make_pair, shapes

CANONICAL = ("b c h w", "b c f h w", "b c l")


@st.composite
def pairs(draw, kinds=KINDS, dtype=torch.float64):
    """``(c, u)`` of a canonical 3D/4D/5D shape, one of the contract's pair kinds, three magnitudes."""
    shape = draw(shapes(draw(st.sampled_from(CANONICAL)), max_side=6, max_batch=3))
    kind = draw(st.sampled_from(kinds))
    return make_pair(shape, kind, draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from((1.0, 1e-2, 1e2))), dtype)


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-9, like: torch.Tensor | None = None) -> bool:
    """``|a - b| <= rtol * max|.|`` over ``a``, ``b`` and the inputs ``like`` (outputs may cancel to 0)."""
    scale = max(float(b.abs().max()), float(a.abs().max()), 1e-300)
    if like is not None:
        scale = max(scale, float(like.abs().max()))
    return float((a - b).abs().max()) <= rtol * scale


def ctx_for(c: torch.Tensor, **kw: object) -> gk.GuidanceContext:
    return gk.GuidanceContext.default(c, **kw)


# -- ADG ---------------------------------------------------------------------------------------------------
def adg_official(c: torch.Tensor, u: torch.Tensor, w: float, angle: float = 3.14 / 3) -> torch.Tensor:
    """The official ADG step for one sample (method/ADG_SD3.py, restated): flattened, float64 angle."""
    weight = max(w - 1.0, 0.0) + 1e-3
    cf, uf = c.reshape(-1).double(), u.reshape(-1).double()
    cos = torch.dot(cf / cf.norm(), uf / uf.norm())
    theta = torch.acos(cos)
    theta_new = torch.clip(weight * theta, -angle, angle)
    diff = cf - uf
    perp = diff - torch.dot(diff, uf) / (torch.dot(uf, uf) + 1e-8) * uf
    small = torch.sin(theta) <= 1e-3
    part = perp * weight if small else perp * torch.sin(theta_new) / torch.sin(theta)
    return (torch.cos(theta_new) * cf + part).reshape(c.shape)


@given(pairs(kinds=("independent", "correlated", "offset")), st.floats(0.0, 12.0))
def test_adg_matches_the_official_rule_per_sample(pair, w):
    c, u = pair
    out = adg(c, u, w)
    for i in range(c.shape[0]):
        # the official "+ 1e-8" in the projection, guarded differently here: relative 1e-8 / ||u||^2
        uu = float(u[i].pow(2).sum())
        assert close(out[i], adg_official(c[i], u[i], w), 1e-9 + (w + 1) * 1e-7 / uu)


@given(pairs(), st.floats(0.0, 30.0), st.floats(0.0, math.pi))
def test_adg_norm_bound_and_span(pair, w, max_angle):
    c, u = pair
    out = adg(c, u, w, max_angle)
    assert torch.isfinite(out).all()
    # ‖x0_new‖ <= sqrt(2) ‖x0_c‖ (methods.md §8)
    assert (flat(out).norm(dim=1) <= math.sqrt(2) * flat(c).norm(dim=1) * (1 + 1e-9) + 1e-300).all()
    # the result lies in span{x0_c, x0_u}: least-squares residual ~ 0
    for i in range(c.shape[0]):
        basis = torch.stack([flat(c)[i], flat(u)[i]], 1)
        coef = torch.linalg.lstsq(basis, flat(out)[i, :, None]).solution
        residual = flat(out)[i] - (basis @ coef)[:, 0]
        assert residual.norm() <= 1e-7 * max(float(flat(out)[i].norm()), 1e-300)


@given(pairs(), st.floats(0.0, 1.0))
def test_adg_no_rotation_gives_the_conditional_x0(pair, w):
    c, u = pair
    # w <= 1 with no weight floor: exactly x0_c (methods.md: "w = 1 (exact w - 1) => x0_c")
    assert torch.equal(gk.ADG(scale=w, weight_floor=0.0)(c, u), c)
    assert not gk.ADG(scale=w, weight_floor=0.0).needs_uncond(ctx_for(c))
    # θ = 0 (u a positive multiple of c) gives x0_c at any scale
    assert close(adg(c, 0.5 * c, 9.0), c, 1e-12)


@given(pairs(kinds=("correlated", "independent")), st.floats(1.5, 6.0))
def test_adg_small_angle_limit_is_cfg_without_the_component_along_u(pair, w):
    c, _ = pair
    gen = torch.Generator().manual_seed(0)
    for eps in (1e-3, 1e-4):
        noise = torch.randn(c.shape, generator=gen, dtype=c.dtype)
        per_sample = (flat(c).norm(dim=1) / flat(noise).norm(dim=1)).reshape(-1, *[1] * (c.ndim - 1))
        u = c + eps * per_sample * noise  # angle between c and u about eps
        out = adg(c, u, w, max_angle=math.pi, weight_floor=0.0)
        d = flat(c - u)
        uf = flat(u)
        perp = d - (d * uf).sum(1, keepdim=True) / (uf * uf).sum(1, keepdim=True) * uf
        expected = flat(c) + (w - 1.0) * perp
        err = (flat(out) - expected).norm(dim=1) / flat(c).norm(dim=1)
        assert (err <= 50 * (w * eps) ** 2).all()  # second order in the angle


def test_adg_clamps_the_cosine_instead_of_returning_nan():
    c = torch.full((1, 3, 4, 4), 0.1)  # acos(1 + ulp) is NaN in the official code
    assert torch.equal(adg(c, c.clone(), 7.0), c)


# -- TCFG --------------------------------------------------------------------------------------------------
def svd_projection(c: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``<u, v1> v1`` and ``v1`` from a float64 SVD of ``[c; u]`` (diffusers' formula, in float64)."""
    a = torch.stack([flat(c), flat(u)], 1).double()
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    v1 = vh[:, 0]
    return ((flat(u).double() * v1).sum(1, keepdim=True) * v1).reshape(u.shape), v1, s


@given(pairs())
def test_tangential_projection_equals_the_svd_projection(pair):
    c, u = pair
    ref, v1, s = svd_projection(c, u)
    out = tangential_projection(c, u)
    for i in range(c.shape[0]):
        if s[i, 0] - s[i, 1] <= 1e-6 * s[i, 0]:  # top direction not unique: any answer in the span is right
            continue
        assert close(out[i], ref[i], 1e-7)
        # idempotent: projecting the projection on v1 changes nothing
        p = flat(out)[i]
        assert close((p @ v1[i]) * v1[i], p, 1e-7)


@given(pairs(kinds=("independent", "correlated", "offset", "scaled")))
def test_tangential_projection_is_independent_of_the_stacking_order(pair):
    c, u = pair
    # P projects on the top singular direction of {c, u}; stacked as [u; c] it must be the same line
    pu, pc = tangential_projection(c, u), tangential_projection(u, c)
    for i in range(c.shape[0]):
        if flat(pu)[i].norm() > 1e-12 * flat(u)[i].norm() and flat(pc)[i].norm() > 1e-12 * flat(c)[i].norm():
            cos = float(per_sample_cosine(flat(pu)[i : i + 1], flat(pc)[i : i + 1]))
            assert abs(abs(cos) - 1.0) < 1e-9


@given(pairs(), st.floats(-2.0, 12.0))
def test_tcfg_invariants(pair, w):
    c, u = pair
    assert torch.equal(gk.TCFG(1.0)(c, u), c)
    # u parallel to c: the projection keeps u, so TCFG is CFG
    assert close(tcfg(c, 0.5 * c, w), gk.CFG(w)(c, 0.5 * c), 1e-9, like=(1 + abs(w)) * c)


@settings(max_examples=25)
@given(pairs(kinds=("independent", "correlated", "offset"), dtype=torch.float32), st.floats(1.0, 12.0))
def test_tcfg_matches_diffusers(pair, w):
    from diffusers.guiders import TangentialClassifierFreeGuidance

    c, u = pair
    guider = TangentialClassifierFreeGuidance(guidance_scale=w)
    guider.set_state(step=0, num_inference_steps=10, timestep=torch.tensor(500))
    ref = guider.forward(c, u).pred
    # diffusers runs a float32 SVD; we take the 2x2 Gram eigenvector in float64
    assert close(gk.TCFG(w)(c, u), ref, 2e-4)


# -- CFG-Zero* ---------------------------------------------------------------------------------------------
@settings(max_examples=30)
@given(pairs(dtype=torch.float32), st.floats(0.0, 12.0), st.integers(0, 3), st.integers(0, 4))
def test_cfg_zero_star_matches_diffusers(pair, w, zero_init_steps, step):
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    c, u = pair
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=zero_init_steps)
    guider.set_state(step=step, num_inference_steps=10, timestep=torch.tensor(500))
    ref = guider.forward(c, u).pred
    ctx = ctx_for(c, step=step, num_steps=10, space="flow")
    out = gk.CFGZeroStar(w, zero_init_steps=zero_init_steps)(c, u, ctx)
    # same rule in float32; diffusers divides by ||u||^2 + 1e-8 where we guard ||u|| = 0
    uu = float(flat(u).pow(2).sum(1).min())
    if uu > 1e-2:
        assert close(out, ref, 1e-5 + 1e-7 / uu)


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
        (lambda: gk.ADG(max_angle=4.0), r"max_angle: expected a number <= 3\.14"),
        (lambda: gk.ADG(weight_floor=-1.0), r"weight_floor: expected a number >= 0"),
        (lambda: gk.TCFG(float("nan")), r"scale: expected a finite number, got nan"),
        (lambda: gk.CFGZeroStar(zero_init_steps=-1), r"zero_init_steps: expected an integer >= 0, got -1"),
        (lambda: gk.CFGZeroStar(zero_init_steps=1.5), r"zero_init_steps: expected an integer >= 0, got 1\.5"),
        (lambda: gk.CFGZeroStar(scaled_shift=1), r"scaled_shift: expected True or False, got 1"),
    ],
)
def test_bad_parameters_are_named(build, match):
    with pytest.raises(gk.ConfigError, match=match):
        build()
