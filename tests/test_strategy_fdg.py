"""FDG (``gk.FDG``, frequency-decoupled guidance): diffusers' guider, methods.md §11 invariants, per-frame
video, and its parameter errors.

diffusers' ``FrequencyDecoupledGuidance`` needs kornia. Without kornia we still run diffusers' own
combination code, with kornia's two pyramid functions replaced by the reference in :mod:`fdg_reference`
(restated from kornia 0.9's source). With kornia installed (the ``test`` extra), the same checks also run
against kornia itself.
"""

from __future__ import annotations

import pytest
import torch
from fdg_reference import KINDS, close, image_pairs, ref_laplacian_pyramid, ref_pyrup
from hypothesis import given, settings
from hypothesis import strategies as st

import guidekit as gk
from guidekit.ops.frequency import fdg
from guidekit.ops.guidance import project
from guidekit.testing import make_pair


# -- FDG against diffusers -------------------------------------------------------------------------------
def _diffusers_fdg(c, u, scales, parallel_weights, monkeypatch=None):
    from diffusers.guiders import frequency_decoupled_guidance as module

    if monkeypatch is not None:
        monkeypatch.setattr(module, "_CAN_USE_KORNIA", True)
        monkeypatch.setattr(module, "build_laplacian_pyramid_func", ref_laplacian_pyramid)
        monkeypatch.setattr(module, "upsample_and_blur_func", ref_pyrup)
    guider = module.FrequencyDecoupledGuidance(guidance_scales=list(scales), parallel_weights=parallel_weights)
    guider.set_state(step=0, num_inference_steps=10, timestep=torch.tensor(500))
    return guider.forward(c, u).pred


@st.composite
def fdg_settings(draw, levels: int):
    scales = draw(st.lists(st.floats(1.5, 12.0), min_size=levels, max_size=levels))
    weights = draw(st.none() | st.lists(st.floats(0.0, 1.0), min_size=levels, max_size=levels))
    return scales, weights


@settings(max_examples=25)
@given(st.data())
def test_fdg_matches_diffusers_guider_with_the_reference_pyramid(data):
    c, u, levels = data.draw(image_pairs(kinds=("independent", "correlated", "offset")))
    scales, weights = data.draw(fdg_settings(levels))
    with pytest.MonkeyPatch.context() as mp:
        ref = _diffusers_fdg(c, u, scales, weights, mp)
    out = gk.FDG(tuple(scales), None if weights is None else tuple(weights))(c, u)
    assert close(out, ref, 1e-10, max(scales) * (c.abs() + u.abs()))


@settings(max_examples=15)
@given(st.data())
def test_fdg_matches_diffusers_guider_with_kornia(data):
    pytest.importorskip("kornia")
    c, u, levels = data.draw(image_pairs(kinds=("independent", "correlated", "offset")))
    scales, weights = data.draw(fdg_settings(levels))
    ref = _diffusers_fdg(c, u, scales, weights)
    out = gk.FDG(tuple(scales), None if weights is None else tuple(weights))(c, u)
    assert close(out, ref, 1e-10, max(scales) * (c.abs() + u.abs()))


# -- invariants (methods.md §11) ---------------------------------------------------------------------------
@st.composite
def any_pairs(draw):
    """3D, 4D and 5D pairs of any small size (odd sides, sides of 1)."""
    rank = draw(st.sampled_from((3, 4, 5)))
    shape = tuple(draw(st.integers(1, 3)) for _ in range(2)) + tuple(draw(st.integers(1, 9)) for _ in range(rank - 2))
    return make_pair(shape, draw(st.sampled_from(KINDS)), draw(st.integers(0, 2**31 - 1)))


@given(any_pairs(), st.floats(-3.0, 12.0), st.integers(1, 4))
def test_fdg_with_equal_scales_is_cfg(pair, w, levels):
    c, u = pair
    like = (1 + abs(w)) * (c.abs() + u.abs())
    assert close(fdg(c, u, [w] * levels), gk.CFG(w)(c, u), 1e-12, like)
    assert close(gk.FDG((w,))(c, u), gk.CFG(w)(c, u), 1e-12, like)  # one level


@given(any_pairs(), st.lists(st.floats(-3.0, 12.0), min_size=1, max_size=4))
def test_fdg_neutral_inputs(pair, scales):
    c, u = pair
    assert torch.equal(gk.FDG(tuple(scales))(c, c.clone()), c)  # c == u
    ones = (1.0,) * len(scales)
    assert torch.equal(gk.FDG(ones)(c, u), c)  # every level at scale 1
    # parallel weight 1 has no effect
    assert torch.equal(fdg(c, u, scales, [1.0] * len(scales)), fdg(c, u, scales))


@given(any_pairs(), st.lists(st.floats(-3.0, 12.0), min_size=2, max_size=4))
def test_fdg_guides_a_constant_difference_with_the_coarsest_scale(pair, scales):
    c, _ = pair
    offset = torch.randn(c.shape[:2], dtype=c.dtype, generator=torch.Generator().manual_seed(3))
    u = c - offset.reshape(*offset.shape, *[1] * (c.ndim - 2))  # Δ constant over space: no fine detail
    like = (1 + max(map(abs, scales))) * (c.abs() + u.abs())
    assert close(fdg(c, u, scales), gk.CFG(scales[-1])(c, u), 1e-12, like)


@given(any_pairs(), st.floats(0.0, 1.0), st.floats(1.5, 9.0))
def test_fdg_one_level_parallel_weight_is_a_projection(pair, beta, w):
    c, u = pair
    if c.ndim != 4:
        return
    par, orth = project(c - u, c)
    expected = u + w * (beta * par + orth)
    assert close(fdg(c, u, [w], [beta]), expected, 1e-10, w * (c.abs() + u.abs()))


@settings(max_examples=30)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 4), st.integers(2, 8), st.integers(2, 8))
def test_fdg_runs_video_frame_by_frame(b, ch, f, h, w):
    c, u = make_pair((b, ch, f, h, w), "correlated", seed=b + f)
    out = gk.FDG((8.0, 3.0), (0.5, 1.0))(c, u)
    per_frame = torch.stack([gk.FDG((8.0, 3.0), (0.5, 1.0))(c[:, :, i], u[:, :, i]) for i in range(f)], 2)
    assert close(out, per_frame, 1e-12, 8 * (c.abs() + u.abs()))


def test_fdg_config_errors_name_the_argument():
    with pytest.raises(gk.ConfigError, match=r"scales: expected at least one level"):
        gk.FDG(())
    with pytest.raises(gk.ConfigError, match=r"parallel_weights: expected one weight per level \(2\), got 1"):
        gk.FDG((10.0, 5.0), (0.5,))
    with pytest.raises(gk.ConfigError, match=r"scales\[1\]: expected a finite number, got inf"):
        gk.FDG((10.0, float("inf")))
    with pytest.raises(gk.ShapeError, match=r"pred_cond: expected \(b, c, l\)"):
        fdg(torch.zeros(2, 3), torch.zeros(2, 3), [2.0])
