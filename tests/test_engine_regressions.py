"""The four defects the engine fixed, each pinned by a test that failed on the code before it.

* Interval windows moved with the dtype: float32 sigmas rounded across ``from_fractions`` edges, and the
  same schedule value was inside in float64 and outside in float32 (also predictor vs corrector under churn).
* CFG++ on DPM-Solver++(2M): the multistep history held the guided x0, not the unconditional one.
* Adaptive Guidance on Heun: the switching step's corrector ignored the step's decision.
* CFG++ on Heun: the corrector evaluated a conditional prediction that never reached the sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

import guidekit as gk
from guidekit.ops.timesteps import karras_sigmas
from guidekit.oracle import UNCOND, GaussianMixture
from guidekit.samplers import EDMModel, sample_heun

GM = GaussianMixture.random(num_classes=3, components=2, event_shape=(2, 3, 3), spread=2.0, std=0.4, seed=7)
LABELS = torch.tensor([0, 1, 2])
UNCONDS = torch.full((3,), UNCOND)


def x_T(dtype: torch.dtype = torch.float64, seed: int = 0) -> Tensor:
    return torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype)


def guided_steps(strategy: gk.GuidanceStrategy, dtype: torch.dtype, sampler: str, sigmas: Tensor, **options: Any):
    """The steps whose evaluations ran the unconditional branch, from the step records."""
    records: list[gk.StepRecord] = []
    gk.sample(
        GM.as_model("edm"),
        x_T(dtype),
        prediction="edm",
        sampler=sampler,
        schedule=sigmas,
        strategy=strategy,
        cond=LABELS,
        uncond=UNCONDS,
        progress=False,
        callback=records.append,
        sampler_options=options or None,
    )
    return [r.step for r in records if r.uncond_used]


@dataclass(frozen=True)
class Decisions(gk.Combinator):
    """Logs, per evaluation, (step, substep, guided?) of an Interval it wraps."""

    inner: gk.Interval = gk.Interval()  # noqa: RUF009
    log: list = None  # type: ignore[assignment]

    def combine_branches(self, preds, ctx, state):
        self.log.append((ctx.step, ctx.substep, bool(self.inner.inside(ctx).all())))
        return self.inner.combine_branches(preds, ctx, state)


# -- 1. Interval: one window in every dtype, on every sampler ----------------------------------------------
@pytest.mark.parametrize("sampler", ["euler", "ddim", "heun", "dpmpp-2m", "euler-ancestral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_from_fractions_guides_the_same_steps_in_float32_and_float64(sampler, dtype):
    sigmas = karras_sigmas(10, 0.002, 80.0)
    strategy = gk.Interval.from_fractions(gk.CFG(3.0), 0.2, 0.6, sigmas)
    assert guided_steps(strategy, dtype, sampler, sigmas) == [2, 3, 4, 5]  # int(0.2*10) <= i < int(0.6*10)


def test_from_fractions_matches_the_fraction_rule_for_every_step_count_in_float32():
    for n in range(2, 41):
        sigmas = karras_sigmas(n, 0.002, 80.0)
        for start, stop in ((0.2, 0.6), (0.1, 0.9), (0.33, 0.5)):
            strategy = gk.Interval.from_fractions(gk.CFG(3.0), start, stop, sigmas)
            expected = list(range(int(start * n), int(stop * n)))
            assert guided_steps(strategy, torch.float32, "euler", sigmas) == expected, (n, start, stop)


def test_a_bound_at_a_float32_rounded_schedule_value_decides_the_same_in_both_dtypes():
    sigmas = karras_sigmas(10, 0.002, 80.0)
    k = next(i for i in range(1, 10) if float(sigmas[i].float()) < float(sigmas[i]))  # rounds down in float32
    lo = float(sigmas[k].float())  # sigma_k > lo in float64; float32(sigma_k) == lo
    for dtype in (torch.float32, torch.float64):
        steps = guided_steps(gk.Interval(gk.CFG(3.0), sigma_lo=lo, sigma_hi=None), dtype, "euler", sigmas)
        assert steps == list(range(k + 1)), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_predictor_and_corrector_agree_with_churn(dtype):
    sigmas = karras_sigmas(8, 0.002, 80.0)
    interval = gk.Interval(gk.CFG(3.0), sigma_lo=float(sigmas[5]), sigma_hi=float(sigmas[2]))
    spy = Decisions(interval, [])
    model = EDMModel(GM.as_model("edm"))
    den = gk.guided(model, spy, LABELS, UNCONDS)
    sample_heun(den, model.initial_x(x_T(dtype), sigmas[0]), sigmas, s_churn=4.0, generator=torch.Generator())
    by_step: dict[int, set[bool]] = {}
    for step, _, inside in spy.log:
        by_step.setdefault(step, set()).add(inside)
    assert all(len(v) == 1 for v in by_step.values()), by_step  # one decision per step
    assert [s for s, v in sorted(by_step.items()) if True in v] == [2, 3, 4]


# -- 2. CFG++ on DPM-Solver++(2M): the history holds the unconditional x0 ------------------------------------
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
    sigmas = karras_sigmas(12, 0.002, 80.0)
    model = EDMModel(GM.as_model("edm"))
    x = model.initial_x(x_T(), sigmas[0])
    ours = gk.sample(
        model, x_T(), sampler="dpmpp-2m", schedule=sigmas, strategy=gk.CFGPlusPlus(lam), cond=LABELS, uncond=UNCONDS
    )
    reference = model.final_x(official_cfgpp_dpmpp_2m(x, sigmas, lam))
    assert torch.allclose(ours, reference, atol=1e-10, rtol=0), float((ours - reference).abs().max())


def test_plain_dpmpp_2m_is_unchanged_by_the_cfgpp_history_rule():
    sigmas = karras_sigmas(12, 0.002, 80.0)
    kw = dict(sampler="dpmpp-2m", schedule=sigmas, cond=LABELS, uncond=UNCONDS, prediction="edm")
    plain = gk.sample(GM.as_model("edm"), x_T(), strategy=gk.CFG(1.0), **kw)
    cond_only = gk.sample(GM.as_model("edm"), x_T(), strategy=None, **kw)
    assert torch.equal(plain, cond_only)


# -- 3. Adaptive Guidance on Heun: both evaluations of the switching step follow its decision ---------------
class CountingModel:
    """The oracle's EDM model, logging the batch size of every forward."""

    def __init__(self) -> None:
        self.model, self.batches = GM.as_model("edm"), []

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        self.batches.append(x.shape[0])
        return self.model(x, t, cond)


def test_adaptive_guidance_corrector_follows_the_switch():
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


# -- 4. CFG++ on Heun: the corrector asks only for what the rule uses --------------------------------------
@dataclass(frozen=True)
class ShiftCorrectorCond(gk.CFGPlusPlus):
    """CFG++ whose corrector would see its conditional prediction shifted by 100 (if it asked for one)."""

    def combine_branches(self, preds, ctx, state):
        if ctx.substep > 0 and "cond" in preds:
            preds = {**preds, "cond": preds["cond"] + 100.0}
        return super().combine_branches(preds, ctx, state)


def test_cfgpp_heun_costs_three_nfe_per_step():
    sigmas = karras_sigmas(6, 0.002, 80.0)
    records: list[gk.StepRecord] = []
    kw = dict(sampler="heun", schedule=sigmas, cond=LABELS, uncond=UNCONDS, progress=False, prediction="edm")
    out = gk.sample(GM.as_model("edm"), x_T(), strategy=gk.CFGPlusPlus(0.6), callback=records.append, **kw)
    assert records[-1].nfe == 3 * 5 + 2  # 5 Heun steps (2 + 1), a last Euler step (2)
    assert [r.branches for r in records[:-1]] == [("cond", "uncond")] * 5
    shifted = gk.sample(GM.as_model("edm"), x_T(), strategy=ShiftCorrectorCond(0.6), **kw)
    assert torch.equal(out, shifted)
