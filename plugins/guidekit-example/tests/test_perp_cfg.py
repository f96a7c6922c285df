"""The plugin's own tests: guidekit's shared contract plus the strategy's own invariants."""

from __future__ import annotations

import torch
from guidekit_example import PerpCFG
from hypothesis import given
from hypothesis import strategies as st

import guidekit as gk
from guidekit.ops.guidance import project
from guidekit.testing import check_strategy, examples


def test_found_by_name_and_passes_the_shared_contract():
    assert gk.strategies.get("perp-cfg") is PerpCFG
    check_strategy("perp-cfg")
    check_strategy(PerpCFG(scale=12.0))


@given(ex=examples(), w=st.floats(0.0, 20.0))
def test_the_guidance_step_is_orthogonal_to_the_unconditional_prediction(ex, w):
    c, u = ex.pred_cond, ex.pred_uncond
    step = PerpCFG(w)(c, u, ex.context()) - c
    dots = (step * u).flatten(1).sum(1).abs()
    sizes = step.flatten(1).norm(dim=1) * u.flatten(1).norm(dim=1) + (abs(w - 1) + 1) * 1e-12
    assert bool((dots <= 1e-9 * sizes).all())


@given(ex=examples(), w=st.floats(0.0, 20.0))
def test_it_is_cfg_when_delta_is_already_orthogonal_to_u(ex, w):
    u = ex.pred_uncond
    _, delta_orth = project(ex.pred_cond - u, u)
    c = u + delta_orth  # now c - u is orthogonal to u
    expected = gk.CFG(w)(c, u, ex.context())
    assert torch.allclose(PerpCFG(w)(c, u, ex.context()), expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))
