"""The catalogue through the real guided loop, on the exact Gaussian-mixture oracle.

* CFG++ (sampler-coupled): equals plain CFG at ``w_eff = λσ/(σ - σ')`` per step on DDIM, Euler and flow
  Euler, for eps, v, flow and x0 models; equals the paper's DDIM update written out by hand.
* CFG-Zero*: zero-init steps call no network and leave a flow sample where it is.
* Adaptive Guidance: NFE saved, monotone switch, the two limits (never / from step 0).
* AutoGuidance: Karras et al.'s ``D_weak + w (D - D_weak)`` with a second network; refused without one.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

import guidekit as gk
from guidekit.ops.guidance import cfg, cfgpp_weight
from guidekit.ops.spaces import flow_x, vp_alpha
from guidekit.ops.timesteps import betas_linear, vp_sigmas
from guidekit.oracle import UNCOND, GaussianMixture

GM = GaussianMixture.random(num_classes=3, components=2, event_shape=(2, 3, 3), spread=2.0, std=0.4, seed=7)
LABELS = torch.tensor([0, 1, 2])
UNCONDS = torch.full((3,), UNCOND)
ACP = torch.cumprod(1 - betas_linear(), 0)


def x_T(seed: int) -> Tensor:
    return torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class EffectiveCFG(gk.GuidanceStrategy):
    """Plain CFG at CFG++'s equivalent weight ``w_eff = λσ/(σ - σ')`` (needs ``ctx.sigma_next``)."""

    lam: float = 0.6

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: gk.GuidanceContext) -> Tensor:
        w = cfgpp_weight(self.lam, ctx.sigma, ctx.sigma_next).to(pred_cond.dtype)
        return cfg(pred_cond, pred_uncond, w.reshape(-1, *[1] * (pred_cond.ndim - 1)))


# -- CFG++ -------------------------------------------------------------------------------------------------
@settings(max_examples=12)
@given(
    st.floats(0.0, 1.0),
    st.integers(1, 8),
    st.sampled_from([("eps", "ddim"), ("eps", "euler"), ("v", "ddim"), ("flow", "flow-euler"), ("edm", "euler")]),
    st.integers(0, 99),
)
def test_cfgpp_equals_cfg_at_the_effective_weight_through_the_loop(lam, steps, model_and_sampler, seed):
    prediction, sampler = model_and_sampler
    kw = dict(sampler=sampler, steps=steps, cond=LABELS, uncond=UNCONDS, prediction=prediction, progress=False)
    model = GM.as_model(prediction)
    ours = gk.sample(model, x_T(seed), strategy=gk.CFGPlusPlus(lam), **kw)
    reference = gk.sample(model, x_T(seed), strategy=EffectiveCFG(lam), **kw)
    assert torch.allclose(ours, reference, rtol=0, atol=1e-10 * float(reference.abs().max()))


@settings(max_examples=8)
@given(st.floats(0.0, 1.0), st.integers(1, 12), st.integers(0, 99))
def test_cfgpp_ddim_is_the_papers_update(lam, steps, seed):
    """Alg. 1 of the paper (CFGpp ``BaseDDIMCFGpp``), written out in VP coordinates on the oracle's eps."""
    sigmas = vp_sigmas(ACP, steps, "trailing")
    z = x_T(seed)
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        a, a_next = vp_alpha(s), vp_alpha(s_next)  # sqrt(alphas_cumprod)
        x_edm = z / a
        eps_c = GM.predict(x_edm, s, LABELS, "eps")
        eps_u = GM.predict(x_edm, s, UNCONDS, "eps")
        eps_lam = eps_u + lam * (eps_c - eps_u)
        x0 = (z - torch.sqrt(1 - a**2) * eps_lam) / a
        z = a_next * x0 + torch.sqrt(1 - a_next**2) * eps_u  # re-noise with the unconditional eps
    ours = gk.sample(
        GM.as_model("eps", alphas_cumprod=ACP),
        x_T(seed),
        sampler="ddim",
        schedule=sigmas,
        strategy=gk.CFGPlusPlus(lam),
        cond=LABELS,
        uncond=UNCONDS,
        alphas_cumprod=ACP,
        progress=False,
    )
    assert torch.allclose(ours, z, rtol=0, atol=1e-9)


def test_cfgpp_limits_and_last_step():
    kw = dict(sampler="euler", steps=6, cond=LABELS, uncond=UNCONDS, prediction="eps", progress=False)
    model = GM.as_model("eps")
    # λ = 0 is the unconditional sampler (every w_eff is 0)
    assert torch.allclose(
        gk.sample(model, x_T(0), strategy=gk.CFGPlusPlus(0.0), **kw),
        gk.sample(model, x_T(0), strategy=gk.CFG(0.0), **kw),
        rtol=0,
        atol=1e-12,
    )
    # the last step (sigma' = 0) returns CFG's x0 at λ
    den = gk.guided(gk.samplers.adapt(model, "eps"), gk.CFGPlusPlus(0.7), LABELS, UNCONDS)
    sigmas = torch.tensor([2.0, 0.0], dtype=torch.float64)
    x = x_T(1) * 2.0
    out = den(x, sigmas[:1].expand(3), gk.samplers.StepInfo(0, 1, sigmas))
    x0_c = GM.predict(x, sigmas[0], LABELS, "x0")
    x0_u = GM.predict(x, sigmas[0], UNCONDS, "x0")
    assert torch.allclose(out.x0, x0_u + 0.7 * (x0_c - x0_u), rtol=0, atol=1e-12)
    assert torch.allclose(gk.samplers.sample_euler(den, x, sigmas), out.x0, rtol=0, atol=1e-12)


# -- CFG-Zero* -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zero_init_steps", [0, 1, 3])
def test_cfg_zero_star_zero_init_skips_the_network_and_keeps_the_flow_sample(zero_init_steps):
    calls = []
    flow_model = GM.as_model("flow")

    def counted(x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        calls.append(x.shape[0])
        return flow_model(x, t, labels)

    steps = 6
    adapter = gk.samplers.adapt(counted, "flow")
    den = gk.guided(adapter, gk.CFGZeroStar(4.0, zero_init_steps=zero_init_steps), LABELS, UNCONDS)
    sigmas = gk.samplers.flow_sigmas(steps)
    start = adapter.initial_x(x_T(2), sigmas[0])
    seen = []
    gk.samplers.sample_flow_euler(den, start, sigmas, callback=lambda s: seen.append(s))
    assert len(calls) == steps - zero_init_steps and den.nfe == 2 * (steps - zero_init_steps)
    for rec in den.records:
        assert rec.model_called == (rec.step >= zero_init_steps)
    for s in seen[:zero_init_steps]:  # velocity 0: the flow sample x_t does not move
        assert torch.allclose(flow_x(s.x, torch.tensor([s.sigma_next]).double()), x_T(2), rtol=0, atol=1e-12)


# -- Adaptive Guidance ---------------------------------------------------------------------------------------
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


# -- AutoGuidance --------------------------------------------------------------------------------------------
WEAK = GaussianMixture(GM.means.reshape(3, 2, 2, 3, 3) * 0.8, 0.7)  # a "bad version": blurrier, shrunk


@settings(max_examples=6)
@given(st.floats(1.0, 4.0), st.integers(0, 99))
def test_autoguidance_is_karras_rule_with_a_second_network(w, seed):
    sigmas = gk.samplers.karras_sigmas(8, 0.01, 40.0)

    def reference(x: Tensor, sigma: Tensor, info: object) -> Tensor:
        main, weak = GM.predict(x, sigma, LABELS, "x0"), WEAK.predict(x, sigma, LABELS, "x0")
        return weak + w * (main - weak)  # eq. 2, same condition for both networks

    start = x_T(seed) * 40.0
    expected = gk.samplers.sample_euler(reference, start, sigmas)
    adapter = gk.samplers.adapt(GM.as_model("edm"), "edm")  # EDM models take sigma as is: exact
    weak = gk.samplers.adapt(WEAK.as_model("edm"), "edm")
    den = gk.guided(adapter, gk.AutoGuidance(w), LABELS, weak_model=weak)
    ours = gk.samplers.sample_euler(den, start, sigmas)
    assert torch.allclose(ours, expected, rtol=0, atol=1e-10)
    per_step = 2 if w != 1.0 else 1  # two networks, two forwards; w = 1 is the main model alone
    assert den.nfe == den.forwards == 8 * per_step


def test_autoguidance_needs_a_weak_model():
    adapter = gk.samplers.adapt(GM.as_model("eps"), "eps")
    for strategy in (gk.AutoGuidance(2.0), gk.Interval(gk.AutoGuidance(2.0)), gk.TVCFG(gk.AutoGuidance(2.0))):
        with pytest.raises(gk.ConfigError, match=r"weak_model: expected the weak model"):
            gk.guided(adapter, strategy, LABELS, UNCONDS)


# -- Adaptive Guidance: the state, unit-level ------------------------------------------------------------
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


_CFGPP = gk.CFGPlusPlus()


@dataclass(frozen=True)
class Hiding(gk.GuidanceStrategy):
    """A third-party combinator that wraps a strategy but forgets the loop hooks."""

    inner: gk.GuidanceStrategy = _CFGPP

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: gk.GuidanceContext) -> Tensor:
        return self.inner.combine(pred_cond, pred_uncond, ctx)


def test_combinators_must_forward_cfgpp_renoising():
    adapter = gk.samplers.adapt(GM.as_model("eps"), "eps")
    den = gk.guided(adapter, gk.Ramp(gk.CFGPlusPlus(0.5)), LABELS, UNCONDS)  # schedules forward the hook
    preds = {"cond": LABELS, "uncond": UNCONDS}
    assert den.strategy.sampler_coupled and den.strategy.renoise_prediction(preds, None) is UNCONDS
    for hiding in (Hiding(), gk.Rescale(Hiding(gk.TVCFG(gk.CFGPlusPlus())))):
        with pytest.raises(gk.ConfigError, match=r"strategy: expected Hiding to be sampler-coupled"):
            gk.guided(adapter, hiding, LABELS, UNCONDS)
    assert not gk.Interval(gk.CFG()).sampler_coupled  # delegation alone does not couple


@settings(max_examples=6)
@given(st.integers(2, 8), st.integers(0, 99))
def test_interval_and_rescale_carry_cfgpp_renoising(steps, seed):
    kw = dict(sampler="ddim", steps=steps, cond=LABELS, uncond=UNCONDS, prediction="eps", progress=False)
    model = GM.as_model("eps")
    plain = gk.sample(model, x_T(seed), strategy=gk.CFGPlusPlus(0.6), **kw)
    everywhere = gk.sample(model, x_T(seed), strategy=gk.Interval(gk.CFGPlusPlus(0.6), 0.0, None), **kw)
    assert torch.equal(everywhere, plain)
    never = gk.sample(model, x_T(seed), strategy=gk.Interval(gk.CFGPlusPlus(0.6), 1e6, None), **kw)
    assert torch.equal(never, gk.sample(model, x_T(seed), strategy=gk.CFG(1.0), **kw))
    rescaled = gk.sample(model, x_T(seed), strategy=gk.Rescale(gk.CFGPlusPlus(0.6), phi=0.0), **kw)
    assert torch.equal(rescaled, plain)


def test_interval_forwards_zero_init_skips():
    calls = []
    flow_model = GM.as_model("flow")

    def counted(x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        calls.append(x.shape[0])
        return flow_model(x, t, labels)

    adapter = gk.samplers.adapt(counted, "flow")
    strategy = gk.Interval(gk.CFGZeroStar(4.0, zero_init_steps=2), 0.0, None)
    den = gk.guided(adapter, strategy, LABELS, UNCONDS)
    sigmas = gk.samplers.flow_sigmas(6)
    gk.samplers.sample_flow_euler(den, adapter.initial_x(x_T(2), sigmas[0]), sigmas)
    assert len(calls) == 4 and [r.model_called for r in den.records] == [False, False, True, True, True, True]
