"""The conventions of the math floor, each defined once: timesteps, flow time, shapes and checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from guidekit.errors import ConfigError, NonFiniteError, ShapeError
from guidekit.ops.checks import all_finite, check_finite, check_number, is_finite_number
from guidekit.ops.shapes import (
    append_dims,
    compute_dtype,
    frames_as_images,
    images_as_frames,
    per_sample,
    per_sample_full,
    upcast,
)
from guidekit.ops.spaces import convert, flow_t_from_sigma, sigma_from_flow_t, to_x0, x0_delta_scale
from guidekit.ops.timesteps import flow_sigmas, flow_times, trailing_timestep, vp_timesteps


def _diffusers_trailing(n: int, total: int = 1000) -> list[int]:
    """diffusers' ``timestep_spacing="trailing"``, written out: numpy ``arange`` and ``round``, first ``n``."""
    return (np.round(np.arange(total, 0, -total / n)).astype(np.int64) - 1)[:n].tolist()


def test_trailing_timesteps_follow_numpy_for_every_step_count() -> None:
    # torch's arange rounds differently from numpy's for 50 step counts in 1..1000 (48: 936 vs 937), and
    # numpy yields one element too many for some (61: a trailing -1); both helpers used to disagree
    for n in range(1, 1001):
        assert vp_timesteps(1000, n, "trailing").long().tolist() == _diffusers_trailing(n), n
    assert [trailing_timestep(i, 48) for i in range(4)] == _diffusers_trailing(48)[:4]
    assert trailing_timestep(3, 48) == 936


def test_flow_time_has_one_meaning_in_schedules_and_conversions() -> None:
    times = flow_times(7, shift=3.0)
    sigmas = flow_sigmas(7, shift=3.0)
    assert math.isinf(float(sigmas[0])) and float(sigmas[-1]) == 0.0
    torch.testing.assert_close(flow_t_from_sigma(sigmas), times, rtol=0, atol=1e-15)
    torch.testing.assert_close(sigma_from_flow_t(times[1:]), sigmas[1:], rtol=1e-12, atol=0)


@pytest.mark.parametrize("space", ["x0", "eps", "v", "flow"])
def test_x0_delta_scale_is_the_slope_of_to_x0(space: str) -> None:
    g = torch.Generator().manual_seed(1)
    x, a, b = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([0.3, 1.0, 7.0], dtype=torch.float64)
    diff = to_x0(a, space, x, sigma) - to_x0(b, space, x, sigma)  # type: ignore[arg-type]
    k = x0_delta_scale(space, sigma).to(torch.float64)  # type: ignore[arg-type]
    torch.testing.assert_close(diff, append_dims(k, 4) * (a - b), rtol=1e-6, atol=1e-6)
    back = convert(convert(a, space, "x0", x, sigma), "x0", space, x, sigma)  # type: ignore[arg-type]
    torch.testing.assert_close(back, a)


@pytest.mark.parametrize("layout_shape", [(2, 3, 8, 8), (2, 3, 4, 8, 8), (2, 3, 9)])
def test_frames_as_images_round_trips_4d_5d_and_1d(layout_shape: tuple[int, ...]) -> None:
    x = torch.randn(layout_shape)
    images = frames_as_images(x)
    assert images.ndim == 4 and images.shape[1] == 3
    assert torch.equal(images_as_frames(images, x), x)
    if x.ndim == 5:  # each frame is one image of its sample
        assert torch.equal(images[1], x[0, :, 1])


def test_per_sample_helpers_broadcast_over_any_rank() -> None:
    like = torch.zeros(3, 2, 4, 5, 6, dtype=torch.float16)
    v = torch.tensor([1.0, 2.0, 3.0])
    assert per_sample(v, like).shape == (3, 1, 1, 1, 1) and per_sample(v, like).dtype == torch.float16
    assert per_sample(v, like, dtype=torch.float64).dtype == torch.float64
    assert per_sample(torch.tensor(2.0), like).shape == (1, 1, 1, 1, 1)
    with pytest.raises(ShapeError, match=r"ctx.sigma: expected 3 values \(one per sample\) or one, got shape \(2,\)"):
        per_sample(torch.ones(2), like)
    full = per_sample_full(like, 7.5)
    assert full.shape == (3, 1, 1, 1, 1) and full.dtype == torch.float16 and float(full[2].flatten()[0]) == 7.5
    assert compute_dtype(like) == torch.float32 == upcast(like).dtype
    assert compute_dtype(like.double()) == torch.float64 == upcast(like.double()).dtype


def test_finite_checks_agree_with_the_element_wise_test() -> None:
    big = torch.full((4,), 3e38)  # finite, but its float32 sum overflows: the fast test must not raise
    assert all_finite(big)
    check_finite(big, "big")
    bad = torch.tensor([1.0, float("nan"), float("inf")])
    assert not all_finite(bad)
    with pytest.raises(NonFiniteError, match=r"pred_cond: expected finite values, got 2 NaN/Inf of 3"):
        check_finite(bad, "pred_cond")


@pytest.mark.parametrize("value", [True, "3", float("nan"), float("inf"), None])
def test_number_checks_refuse_what_is_not_a_finite_number(value: object) -> None:
    assert not is_finite_number(value)
    with pytest.raises(ConfigError, match=rf"scale: expected a finite number, got {value!r}"):
        check_number("scale", value)
    assert check_number("scale", 3) == 3.0 and isinstance(check_number("scale", 3), float)
