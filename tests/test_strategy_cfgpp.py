"""CFG++ (``gk.CFGPlusPlus``, sampler-coupled), through the real guided loop on the exact Gaussian-mixture
oracle: equal to plain CFG at ``w_eff = λσ/(σ - σ')`` per step on DDIM, Euler and flow Euler, for eps, v,
flow and x0 models; equal to the paper's DDIM update written out by hand; its limits and last step; the
combinators that must (and do) carry its re-noising.

The engine defects it pins (each test failed on the code before the fix):

* CFG++ on DPM-Solver++(2M): the multistep history held the guided x0, not the unconditional one.
* CFG++ on Heun: the corrector evaluated a conditional prediction that never reached the sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loop_helpers import GM, LABELS, UNCONDS, x_T
from torch import Tensor

import guidekit as gk
from guidekit.ops.guidance import cfg, cfgpp_weight
from guidekit.ops.spaces import vp_alpha
from guidekit.ops.timesteps import betas_linear, karras_sigmas, vp_sigmas
from guidekit.samplers import EDMModel

ACP = torch.cumprod(1 - betas_linear(), 0)


@dataclass(frozen=True)
class EffectiveCFG(gk.GuidanceStrategy):
    """Plain CFG at CFG++'s equivalent weight ``w_eff = λσ/(σ - σ')`` (needs ``ctx.sigma_next``)."""

    lam: float = 0.6

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: gk.GuidanceContext) -> Tensor:
        w = cfgpp_weight(self.lam, ctx.sigma, ctx.sigma_next).to(pred_cond.dtype)
        return cfg(pred_cond, pred_uncond, w.reshape(-1, *[1] * (pred_cond.ndim - 1)))


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


# -- combinators carry the re-noising -------------------------------------------------------------------
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


# -- engine defect: CFG++ on DPM-Solver++(2M), the history holds the unconditional x0 ---------------------
def official_cfgpp_dpmpp_2m(x: Tensor, sigmas: Tensor, lam: float) -> Tensor:
    """CFG++ DPM-Solver++(2M) written out as in the official code / ComfyUI ``sample_dpmpp_2m_cfg_pp``."""
    model = EDMModel(GM.as_model("edm"))
    old_uncond = None
    for i in range(len(sigmas) - 1):
        s = sigmas[i].expand(x.shape[0])
        d_c = model.to_x0(model.predict(x, s, LABELS), x, s)
        d_u = model.to_x0(model.predict(x, s, UNCONDS), x, s)
        denoised = d_u + lam * (d_c - d_u)
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old_uncond is None or sigmas[i + 1] == 0:
            mix = -torch.exp(-h) * d_u
        else:
            r = (t + sigmas[i - 1].log()) / h
            mix = -torch.exp(-h) * d_u - torch.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond)
        x = denoised + mix + torch.exp(-h) * x
        old_uncond = d_u
    return x


@pytest.mark.parametrize("lam", [0.3, 0.8])
def test_cfgpp_dpmpp_2m_equals_the_official_update(lam):
    """Engine defect: on DPM-Solver++(2M) the multistep history held the guided x0, not the unconditional one."""
    sigmas = karras_sigmas(12, 0.002, 80.0)
    model = EDMModel(GM.as_model("edm"))
    x = model.initial_x(x_T(), sigmas[0])
    ours = gk.sample(
        model, x_T(), sampler="dpmpp-2m", schedule=sigmas, strategy=gk.CFGPlusPlus(lam), cond=LABELS, uncond=UNCONDS
    )
    reference = model.final_x(official_cfgpp_dpmpp_2m(x, sigmas, lam))
    assert torch.allclose(ours, reference, atol=1e-10, rtol=0), float((ours - reference).abs().max())


def test_plain_dpmpp_2m_is_unchanged_by_the_cfgpp_history_rule():
    """The fix for the DPM-Solver++(2M) history defect leaves plain (non-CFG++) sampling as it was."""
    sigmas = karras_sigmas(12, 0.002, 80.0)
    kw = dict(sampler="dpmpp-2m", schedule=sigmas, cond=LABELS, uncond=UNCONDS, prediction="edm")
    plain = gk.sample(GM.as_model("edm"), x_T(), strategy=gk.CFG(1.0), **kw)
    cond_only = gk.sample(GM.as_model("edm"), x_T(), strategy=None, **kw)
    assert torch.equal(plain, cond_only)


# -- engine defect: CFG++ on Heun, the corrector asks only for what the rule uses --------------------------
@dataclass(frozen=True)
class ShiftCorrectorCond(gk.CFGPlusPlus):
    """CFG++ whose corrector would see its conditional prediction shifted by 100 (if it asked for one)."""

    def combine_branches(self, preds, ctx, state):
        if ctx.substep > 0 and "cond" in preds:
            preds = {**preds, "cond": preds["cond"] + 100.0}
        return super().combine_branches(preds, ctx, state)


def test_cfgpp_heun_costs_three_nfe_per_step():
    """Engine defect: on Heun the corrector evaluated a conditional prediction that never reached the sample."""
    sigmas = karras_sigmas(6, 0.002, 80.0)
    records: list[gk.StepRecord] = []
    kw = dict(sampler="heun", schedule=sigmas, cond=LABELS, uncond=UNCONDS, progress=False, prediction="edm")
    out = gk.sample(GM.as_model("edm"), x_T(), strategy=gk.CFGPlusPlus(0.6), callback=records.append, **kw)
    assert records[-1].nfe == 3 * 5 + 2  # 5 Heun steps (2 + 1), a last Euler step (2)
    assert [r.branches for r in records[:-1]] == [("cond", "uncond")] * 5
    shifted = gk.sample(GM.as_model("edm"), x_T(), strategy=ShiftCorrectorCond(0.6), **kw)
    assert torch.equal(out, shifted)
