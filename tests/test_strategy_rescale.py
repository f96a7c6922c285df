"""Guidance rescale (``gk.Rescale``): wraps its inner strategy with ``ops.guidance.rescale_std``, passes
the inner state through, follows the inner strategy's space; bad parameters are named."""

from __future__ import annotations

import pytest
import torch
from gen import examples
from hypothesis import given
from hypothesis import strategies as st
from strategy_helpers import ctx_at, sequence

import guidekit as gk
from guidekit.errors import ConfigError
from guidekit.ops.guidance import cfg, rescale_std


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
