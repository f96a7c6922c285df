"""FDG and its Laplacian pyramid: methods.md §11 invariants, kornia's pyramid and diffusers' guider.

diffusers' ``FrequencyDecoupledGuidance`` needs kornia. Without kornia we still run diffusers' own
combination code, with kornia's two pyramid functions replaced by a reference restated from kornia 0.9's
source (``build_laplacian_pyramid``: 5x5 binomial ``filter2d`` with a reflect border, bilinear resize; no
padding for the sizes used). With kornia installed (the ``test`` extra), the same checks also run
against kornia itself.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import guidekit as gk
from guidekit.ops.frequency import fdg, laplacian_pyramid, reconstruct_pyramid
from guidekit.ops.guidance import project
from guidekit.testing import make_pair

KINDS = ("independent", "correlated", "offset", "equal", "zero_sample", "tiny_delta")


# -- a reference pyramid, restated from kornia's source --------------------------------------------------
def _kornia_blur(x: torch.Tensor) -> torch.Tensor:
    k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype)
    kernel = torch.outer(k1, k1) / 256.0  # kornia's _get_pyramid_gaussian_kernel
    c = x.shape[1]
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    return F.conv2d(padded, kernel.expand(c, 1, 5, 5), groups=c)


def ref_pyrup(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    return _kornia_blur(F.interpolate(x, size=(2 * h, 2 * w), mode="bilinear", align_corners=False))


def ref_laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    gaussian = [x]
    for _ in range(levels - 1):
        h, w = gaussian[-1].shape[-2:]
        gaussian.append(F.interpolate(_kornia_blur(gaussian[-1]), size=(h // 2, w // 2), mode="bilinear"))
    return [g - ref_pyrup(n) for g, n in pairwise(gaussian)] + [gaussian[-1]]


@st.composite
def kornia_sizes(draw, levels: int):
    """(h, w) that kornia takes as they are: divisible by 2**(levels-1), one a power of two, >= 3 at the top."""
    step = 2 ** (levels - 1)
    h = draw(st.sampled_from([2**k for k in range(2, 6) if 2**k >= 3 * step] or [4 * step]))
    w = step * draw(st.integers(3, 6))
    return (h, w) if draw(st.booleans()) else (w, h)


@st.composite
def image_pairs(draw, levels: int | None = None, kinds=KINDS):
    levels = draw(st.integers(1, 3)) if levels is None else levels
    h, w = draw(kornia_sizes(levels))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 4)), h, w)
    c, u = make_pair(shape, draw(st.sampled_from(kinds)), draw(st.integers(0, 2**31 - 1)))
    return c, u, levels


def close(a: torch.Tensor, b: torch.Tensor, rtol: float, like: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= rtol * max(float(like.abs().max()), 1e-300)


# -- the pyramid -----------------------------------------------------------------------------------------
@given(
    st.integers(1, 3), st.integers(1, 4), st.integers(1, 11), st.integers(1, 11), st.integers(1, 5), st.integers(0, 99)
)
def test_pyramid_reconstructs_every_shape_exactly(b, c, h, w, levels, seed):
    x = torch.randn(b, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    pyramid = laplacian_pyramid(x, levels)
    assert len(pyramid) == levels and pyramid[0].shape == x.shape
    assert close(reconstruct_pyramid(pyramid), x, 1e-12, x)


@settings(max_examples=30)
@given(image_pairs())
def test_pyramid_matches_kornias_algorithm(example):
    x, _, levels = example
    for ours, ref in zip(laplacian_pyramid(x, levels), ref_laplacian_pyramid(x, levels), strict=True):
        assert close(ours, ref, 1e-12, x)


@settings(max_examples=20)
@given(image_pairs())
def test_pyramid_matches_kornia(example):
    kornia = pytest.importorskip("kornia")
    x, _, levels = example
    theirs = kornia.geometry.transform.build_laplacian_pyramid(x, levels)
    for ours, ref in zip(laplacian_pyramid(x, levels), theirs, strict=True):
        assert close(ours, ref, 1e-12, x)


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
