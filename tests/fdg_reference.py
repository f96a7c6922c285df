"""A Laplacian pyramid restated from kornia 0.9's source, for the pyramid and FDG tests.

``build_laplacian_pyramid``: 5x5 binomial ``filter2d`` with a reflect border, bilinear resize; no padding
for the sizes :func:`kornia_sizes` draws. :func:`image_pairs` draws prediction pairs of those sizes, and
:func:`close` is the tolerance check both test files use.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from guidekit.testing import make_pair

KINDS = ("independent", "correlated", "offset", "equal", "zero_sample", "tiny_delta")


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
