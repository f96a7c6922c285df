"""Differential tests against diffusers' guiders (pinned diffusers 0.42.1).

* CFG == ``ClassifierFreeGuidance``; Rescale(CFG) == ``ClassifierFreeGuidance(guidance_rescale=φ)``.
* APG: we follow the paper (``c + (w-1)·update``); diffusers' default form is ``u + w·update``. They agree
  when ``update == Δ`` (eta = 1, threshold not reached, no momentum); diffusers'
  ``use_original_formulation=True`` with scale ``w - 1`` *is* the paper form, momentum included.
  Where they differ, the difference is exactly ``update - Δ`` (tested).
* Interval.from_fractions guides exactly the steps of diffusers' ``start``/``stop`` window.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from gen import examples
from hypothesis import given, settings
from hypothesis import strategies as st

import guidekit as gk
from guidekit.ops.guidance import cfg, project, rescale_std
from guidekit.testing import make_pair

guiders = pytest.importorskip("diffusers.guiders")
apg_module = pytest.importorskip("diffusers.guiders.adaptive_projected_guidance")
from diffusers.guiders.guider_utils import rescale_noise_cfg  # noqa: E402

logging.getLogger("diffusers").setLevel(logging.ERROR)  # "guiders are experimental" on every construction

pytestmark = pytest.mark.diffusers


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10) -> bool:
    scale = max(float(b.abs().max()), 1e-30)
    return bool(((a - b).abs() <= rtol * (b.abs() + scale)).all())


def their_cfg(c: torch.Tensor, u: torch.Tensor, w: float, rescale: float = 0.0) -> torch.Tensor:
    return guiders.ClassifierFreeGuidance(guidance_scale=w, guidance_rescale=rescale).forward(c, u).pred


def their_apg(c, u, w, *, eta, rescale, momentum=None, original=False, steps=None):
    """diffusers' APG guider over a sequence of steps (a fresh momentum buffer at step 0, as in a pipeline)."""
    g = guiders.AdaptiveProjectedGuidance(
        guidance_scale=w,
        adaptive_projected_guidance_momentum=momentum,
        adaptive_projected_guidance_rescale=rescale,
        eta=eta,
        use_original_formulation=original,
    )
    if momentum is not None:
        g.momentum_buffer = apg_module.MomentumBuffer(momentum)
    return [g.forward(ci, ui).pred for ci, ui in (steps or [(c, u)])]


@given(ex=examples(), w=st.floats(-2.0, 20.0).filter(lambda w: not math.isclose(w, 1.0)))
def test_cfg_equals_diffusers_classifier_free_guidance(ex, w):
    c, u = ex.pred_cond, ex.pred_uncond
    assert close(gk.CFG(w)(c, u, ex.context()), their_cfg(c, u, w), 1e-12)


@settings(max_examples=30)
@given(ex=examples(), w=st.floats(1.5, 15.0), phi=st.floats(0.0, 1.0))
def test_rescale_equals_diffusers_guidance_rescale(ex, w, phi):
    c, u = ex.pred_cond, ex.pred_uncond
    theirs = their_cfg(c, u, w, rescale=phi)
    ours = gk.Rescale(gk.CFG(w), phi)(c, u, ex.context())
    # a constant guided sample has std 0 (diffusers: NaN) or a rounding-level std (diffusers: rescaled to
    # std(c)); we leave such samples unchanged (docs/math.md). Compare the others.
    guided = cfg(c, u, w).flatten(1)
    varied = guided.std(dim=1) > 1e-12 * guided.abs().amax(dim=1)
    if bool(varied.any()):
        assert close(ours[varied], theirs[varied], 1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rescale_matches_rescale_noise_cfg_on_video_in_low_precision(dtype):
    c, u = make_pair((2, 4, 3, 8, 6), "correlated", seed=11, dtype=dtype)
    guided = gk.CFG(7.5)(c, u)
    ours = rescale_std(guided, c, 0.7)
    theirs = rescale_noise_cfg(guided.float(), c.float(), 0.7)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ours.dtype == dtype and torch.allclose(ours.float(), theirs, rtol=tol, atol=tol * float(theirs.abs().max()))


@settings(max_examples=30)
@given(
    ex=examples(),
    w=st.floats(1.5, 20.0),
    eta=st.floats(0.0, 1.0),
    r=st.one_of(st.just(0.0), st.floats(0.1, 30.0)),
    momentum=st.one_of(st.none(), st.floats(-0.9, 0.9).filter(lambda m: m != 0)),
)
def test_apg_equals_diffusers_original_formulation_with_scale_minus_one(ex, w, eta, r, momentum):
    c, u = ex.pred_cond, ex.pred_uncond
    steps = [(c, u), (c * 0.9 + 0.1, u * 1.1), (c - 0.2 * u, u * 0.5)]
    ours_s = gk.APG(scale=w, eta=eta, norm_threshold=r, momentum=momentum or 0.0)
    state, ours = ours_s.init_state(c), []
    for i, (ci, ui) in enumerate(steps):
        out, state = ours_s.step(ci, ui, ex.context(step=i), state)
        ours.append(out)
    theirs = their_apg(c, u, w - 1, eta=eta, rescale=r, momentum=momentum, original=True, steps=steps)
    for a, b in zip(ours, theirs, strict=True):
        assert close(a, b, 1e-9)


@given(ex=examples(), w=st.floats(1.5, 20.0))
def test_apg_equals_diffusers_default_form_where_the_update_is_delta(ex, w):
    """eta = 1, no threshold, no momentum: c + (w-1)Δ == u + wΔ."""
    c, u = ex.pred_cond, ex.pred_uncond
    ours = gk.APG(scale=w, eta=1.0, norm_threshold=0.0, momentum=0.0)(c, u, ex.context())
    (theirs,) = their_apg(c, u, w, eta=1.0, rescale=0.0)
    assert close(ours, theirs, 1e-9)


@given(ex=examples(), w=st.floats(1.5, 20.0), eta=st.floats(0.0, 1.0), r=st.floats(0.1, 30.0))
def test_where_paper_and_diffusers_apg_differ_the_gap_is_update_minus_delta(ex, w, eta, r):
    """diffusers - paper = (u + w·upd) - (c + (w-1)·upd) = upd - Δ, with upd the thresholded, projected Δ."""
    c, u = ex.pred_cond, ex.pred_uncond
    delta = c - u
    norm = delta.flatten(1).norm(dim=1).reshape(-1, *([1] * (c.ndim - 1)))
    scaled = delta * torch.clamp(r / norm, max=1.0)
    par, orth = project(scaled, c)
    update = orth + eta * par
    ours = gk.APG(scale=w, eta=eta, norm_threshold=r, momentum=0.0)(c, u, ex.context())
    (theirs,) = their_apg(c, u, w, eta=eta, rescale=r)
    size = float(delta.abs().max()) * w + float(c.abs().max())
    assert bool(((theirs - ours) - (update - delta)).abs().max() <= 1e-9 * size)


def test_diffusers_apg_defaults_are_not_the_papers():
    g = guiders.AdaptiveProjectedGuidance()
    assert (g.eta, g.adaptive_projected_guidance_momentum, g.use_original_formulation) == (1.0, None, False)
    ours = gk.APG()
    assert (ours.eta, ours.momentum) == (0.0, -0.5)
    c, u = make_pair((1, 4, 16, 16), "correlated", seed=3)
    (theirs,) = their_apg(c, u, 15.0, eta=1.0, rescale=15.0)
    assert not torch.allclose(ours(c, u), theirs)  # same scale, different rule: documented, not a bug


@settings(max_examples=40)
@given(
    num_steps=st.integers(1, 50),
    start_stop=st.tuples(st.floats(0, 1), st.floats(0, 1))
    .map(sorted)
    .filter(lambda s: s[0] < 1),  # diffusers: start < 1
)
def test_from_fractions_guides_the_steps_of_diffusers_start_stop_window(num_steps, start_stop):
    start, stop = start_stop
    g = guiders.ClassifierFreeGuidance(guidance_scale=5.0, start=start, stop=stop)
    theirs = []
    for i in range(num_steps):
        g.set_state(step=i, num_inference_steps=num_steps, timestep=torch.tensor(999 - i))
        if g.num_conditions == 2:
            theirs.append(i)
    schedule = torch.cat([torch.logspace(math.log10(80), math.log10(0.002), num_steps), torch.zeros(1)])
    interval = gk.Interval.from_fractions(gk.CFG(5.0), start, stop, schedule)
    ctxs = [gk.GuidanceContext(sigma=schedule[i : i + 1], step=i, num_steps=num_steps) for i in range(num_steps)]
    assert [i for i, ctx in enumerate(ctxs) if interval.needs_uncond(ctx)] == theirs
