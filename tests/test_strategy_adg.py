"""ADG (``gk.ADG``, angle-domain guidance): the official rule (jinc7461/ADG ``method/ADG_SD3.py``,
restated below for one sample, the only batch size it handles), the norm bound and span, the no-rotation
and small-angle limits (methods.md §11), and its parameter errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategy_helpers import close, ctx_for, flat, pairs

import guidekit as gk
from guidekit.ops.guidance import adg


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


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: gk.ADG(max_angle=4.0), r"max_angle: expected a number <= 3\.14"),
        (lambda: gk.ADG(weight_floor=-1.0), r"weight_floor: expected a number >= 0"),
    ],
)
def test_bad_parameters_are_named(build, match):
    with pytest.raises(gk.ConfigError, match=match):
        build()
