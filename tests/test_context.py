"""GuidanceContext helpers: the x0 conversion of prediction differences."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from guidekit.context import GuidanceContext
from guidekit.ops.spaces import x0_delta_scale


@given(st.floats(min_value=1e-4, max_value=1e4))
def test_x0_delta_scale_matches_the_closed_forms(sigma: float) -> None:
    s = torch.tensor([sigma], dtype=torch.float64)
    expected = {"x0": 1.0, "eps": -sigma, "v": -sigma / math.sqrt(1 + sigma**2), "flow": -sigma / (1 + sigma)}
    for space, value in expected.items():
        assert x0_delta_scale(space, s).item() == pytest.approx(value, rel=1e-5)


def test_x0_delta_scale_limits_at_the_singular_points() -> None:
    s = torch.tensor([0.0, math.inf])
    assert x0_delta_scale("v", s).tolist() == [0.0, -1.0]  # sigma = inf: pure noise, x0 = -v
    assert x0_delta_scale("flow", s).tolist() == [0.0, -1.0]  # flow t = 1: x0 = x_t - v
    assert x0_delta_scale("eps", s)[1].item() == -math.inf  # eps carries no x0 information there


def test_x0_delta_scale_rejects_unknown_spaces() -> None:
    with pytest.raises(ValueError, match="space: expected one of"):
        x0_delta_scale("velocity", torch.ones(1))  # type: ignore[arg-type]


def test_default_context_and_progress() -> None:
    ctx = GuidanceContext.default(torch.zeros(3, 4, 2, 2), sigma=2.0)
    assert ctx.sigma.tolist() == [2.0, 2.0, 2.0]
    assert ctx.replace(step=3, num_steps=4).progress == 0.75
