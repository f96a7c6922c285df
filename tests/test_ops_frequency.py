"""The Laplacian pyramid of ``guidekit.ops.frequency`` (FDG's frequency split): exact reconstruction for
every shape, and equal to kornia's algorithm (restated in :mod:`fdg_reference`) and, when kornia is
installed (the ``test`` extra), to kornia itself."""

from __future__ import annotations

import pytest
import torch
from fdg_reference import close, image_pairs, ref_laplacian_pyramid
from hypothesis import given, settings
from hypothesis import strategies as st

from guidekit.ops.frequency import laplacian_pyramid, reconstruct_pyramid


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
