"""TCFG (``gk.TCFG``, tangential CFG) and its tangential projection: equal to a float64 SVD projection and
independent of the stacking order, the invariants, diffusers 0.42.1 ``TangentialClassifierFreeGuidance``,
and its parameter errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategy_helpers import close, flat, pairs

import guidekit as gk
from guidekit.ops.guidance import per_sample_cosine, tangential_projection, tcfg


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


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: gk.TCFG(float("nan")), r"scale: expected a finite number, got nan"),
    ],
)
def test_bad_parameters_are_named(build, match):
    with pytest.raises(gk.ConfigError, match=match):
        build()
