"""CFG (``gk.CFG``): the strategy is the ``ops.guidance.cfg`` formula, scale 1 skips the unconditional
branch, the eps/x0 linearity lemma (methods.md §2), and a bad scale is named."""

from __future__ import annotations

import pytest
import torch
from gen import examples, sigmas
from hypothesis import given
from hypothesis import strategies as st

import guidekit as gk
from guidekit.errors import ConfigError
from guidekit.ops.guidance import cfg


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
