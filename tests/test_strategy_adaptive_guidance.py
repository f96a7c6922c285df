"""Adaptive Guidance (``gk.AdaptiveGuidance``), through the real guided loop on the exact Gaussian-mixture
oracle: NFE saved, a monotone switch, the two limits (never / from step 0); unit-level, its per-sample state
is monotone and a corrector never switches; a sampler-coupled inner strategy is refused.

The engine defect it pins (the test failed on the code before the fix): Adaptive Guidance on Heun, the
switching step's corrector ignored the step's decision.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from loop_helpers import GM, LABELS, UNCONDS, x_T
from torch import Tensor

import guidekit as gk
from guidekit.ops.timesteps import karras_sigmas
from guidekit.samplers import EDMModel, sample_heun


def _run(strategy: gk.GuidanceStrategy, steps: int = 10, seed: int = 3) -> tuple[Tensor, gk.guided]:
    adapter = gk.samplers.adapt(GM.as_model("eps"), "eps")
    den = gk.guided(adapter, strategy, LABELS, UNCONDS)
    sigmas = gk.samplers.karras_sigmas(steps, 0.01, 40.0)
    x = gk.samplers.sample_euler(den, adapter.initial_x(x_T(seed) * 40.0, sigmas[0]), sigmas)
    return x, den


def test_adaptive_guidance_limits():
    cfg_x, cfg_den = _run(gk.CFG(4.0))
    never_x, never_den = _run(gk.AdaptiveGuidance(gk.CFG(4.0), threshold=1.0))
    assert torch.allclose(never_x, cfg_x, rtol=0, atol=1e-10)  # CFG in x0 space: equal up to rounding
    assert never_den.nfe == cfg_den.nfe == 20
    cond_x, _ = _run(gk.CFG(1.0))
    always_x, always_den = _run(gk.AdaptiveGuidance(gk.CFG(4.0), threshold=-1.5))
    assert torch.allclose(always_x, cond_x, rtol=0, atol=1e-12)
    assert always_den.nfe == 2 + 9  # the cosine of step 0 needs u once


@settings(max_examples=10)
@given(st.floats(0.9, 0.9999), st.integers(0, 50))
def test_adaptive_guidance_saves_nfe_monotonically(threshold, seed):
    x, den = _run(gk.AdaptiveGuidance(gk.CFG(4.0), threshold=threshold), seed=seed)
    used = [r.uncond_used for r in den.records]
    assert used == sorted(used, reverse=True)  # once off, never on again
    assert den.nfe == 10 + sum(used)
    assert torch.isfinite(x).all()


@given(st.lists(st.floats(-1.0, 1.0), min_size=2, max_size=6), st.floats(-1.0, 1.0))
def test_adaptive_guidance_state_is_monotone_and_per_sample(cosines, threshold):
    """Sample 0 follows a scripted cosine sequence, sample 1 stays at cos = -1: only sample 0 may switch."""
    # the cosines are rebuilt from angles: keep them (and sample 1's -1) off the threshold
    assume(all(abs(c - threshold) > 1e-9 for c in [*cosines, -1.0]))
    ag = gk.AdaptiveGuidance(gk.CFG(3.0), threshold=threshold)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, 4, dtype=torch.float64, generator=gen)
    ortho = torch.randn(2, 4, dtype=torch.float64, generator=gen)
    ortho = ortho - (ortho * base).sum(1, keepdim=True) / (base * base).sum(1, keepdim=True) * base
    base, ortho = base / base.norm(dim=1, keepdim=True), ortho / ortho.norm(dim=1, keepdim=True)
    state = ag.init_state(base[:, :, None])
    switched_before = False
    for step, cos in enumerate(cosines):
        c = base[:, :, None]
        angle = torch.tensor([cos, -1.0], dtype=torch.float64).clamp(-1, 1).acos()
        u = (torch.cos(angle)[:, None] * base + torch.sin(angle)[:, None] * ortho)[:, :, None]
        ctx = gk.GuidanceContext(sigma=torch.ones(2), step=step, num_steps=len(cosines))
        # a corrector evaluation never switches, whatever the cosine
        _, after_corrector = ag.step(c, u, ctx.replace(substep=1), state)
        assert torch.equal(after_corrector[0], state[0])
        out, state = ag.step(c, u, ctx, state)
        switched = bool(state[0][0])
        assert switched == (switched_before or cos > threshold)  # monotone, switching on γ > γ̄
        assert not bool(state[0][1]) or threshold < -1.0
        expected0 = c[0] if switched else gk.CFG(3.0)(c[:1], u[:1])[0]
        assert torch.allclose(out[0], expected0, rtol=0, atol=1e-12)
        assert torch.allclose(out[1], gk.CFG(3.0)(c[1:], u[1:])[0], rtol=0, atol=1e-12)  # never switches
        assert ag.needs_uncond_state(ctx, state)  # sample 1 still needs u
        switched_before = switched


def test_adaptive_guidance_refuses_sampler_coupled_inner():
    with pytest.raises(gk.ConfigError, match=r"inner: expected a prediction-combining strategy, got .*CFGPlusPlus"):
        gk.AdaptiveGuidance(gk.CFGPlusPlus())
    with pytest.raises(gk.ConfigError, match=r"inner: expected a prediction-combining strategy"):
        gk.AdaptiveGuidance(gk.Ramp(gk.CFGPlusPlus()))
    assert gk.AdaptiveGuidance().space == "x0" and gk.AdaptiveGuidance(gk.TCFG()).space == "native"


# -- engine defect: on Heun, both evaluations of the switching step follow its decision -------------------
class CountingModel:
    """The oracle's EDM model, logging the batch size of every forward."""

    def __init__(self) -> None:
        self.model, self.batches = GM.as_model("edm"), []

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        self.batches.append(x.shape[0])
        return self.model(x, t, cond)


def test_adaptive_guidance_corrector_follows_the_switch():
    """Engine defect: on Heun, the switching step's corrector ignored the step's decision."""
    sigmas = karras_sigmas(10, 0.002, 80.0)
    counting = CountingModel()
    model = EDMModel(counting)
    labels, unconds = LABELS[:1], UNCONDS[:1]
    strategy = gk.AdaptiveGuidance(gk.CFG(3.0), threshold=0.99)
    den = gk.guided(model, strategy, labels, unconds)
    sample_heun(den, model.initial_x(x_T()[:1], sigmas[0]), sigmas)
    switch = next(r.step for r in den.records if not r.uncond_used) - 1  # the last step that ran uncond
    assert 0 < switch < 8
    # forwards per step: predictor then corrector (the last step has no corrector); the switching step's
    # predictor needs [cond; uncond] for the cosine, its corrector only cond (the sample has switched)
    per_step = [counting.batches[2 * i : 2 * i + 2] for i in range(9)]
    assert per_step[switch] == [2, 1], per_step
    assert all(b == [1, 1] for b in per_step[switch + 1 :]), per_step
    assert den.records[switch].nfe - den.records[switch - 1].nfe == 3
