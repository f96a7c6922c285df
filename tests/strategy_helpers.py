"""Inputs and checks shared by the per-strategy tests (``test_strategy_*.py``).

* :func:`pairs`: a hypothesis generator of ``(pred_cond, pred_uncond)`` of a canonical 3D/4D/5D shape, one of
  the contract's pair kinds, three magnitudes.
* :func:`sequence`: a run of correlated pairs, one per step, for the stateful strategies.
* :func:`ctx_at` / :func:`ctx_for`: guidance contexts at given sigmas, or the default one for a tensor.
* :func:`flat` and :func:`close`: per-sample flattening and a relative closeness check.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import guidekit as gk
from guidekit.testing import KINDS, make_pair, shapes


def ctx_at(sigma: float | list[float], batch: int, **kw: object) -> gk.GuidanceContext:
    values = sigma if isinstance(sigma, list) else [sigma] * batch
    return gk.GuidanceContext(sigma=torch.tensor(values, dtype=torch.float32), **kw)  # type: ignore[arg-type]


def sequence(n: int, shape: tuple[int, ...] = (2, 3, 4, 5), seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [make_pair(shape, "correlated", seed + i) for i in range(n)]


CANONICAL = ("b c h w", "b c f h w", "b c l")


@st.composite
def pairs(draw, kinds=KINDS, dtype=torch.float64):
    """``(c, u)`` of a canonical 3D/4D/5D shape, one of the contract's pair kinds, three magnitudes."""
    shape = draw(shapes(draw(st.sampled_from(CANONICAL)), max_side=6, max_batch=3))
    kind = draw(st.sampled_from(kinds))
    return make_pair(shape, kind, draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from((1.0, 1e-2, 1e2))), dtype)


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-9, like: torch.Tensor | None = None) -> bool:
    """``|a - b| <= rtol * max|.|`` over ``a``, ``b`` and the inputs ``like`` (outputs may cancel to 0)."""
    scale = max(float(b.abs().max()), float(a.abs().max()), 1e-300)
    if like is not None:
        scale = max(scale, float(like.abs().max()))
    return float((a - b).abs().max()) <= rtol * scale


def ctx_for(c: torch.Tensor, **kw: object) -> gk.GuidanceContext:
    return gk.GuidanceContext.default(c, **kw)
