"""The diffusers integration on tiny random pipelines built in-process (offline; nothing is downloaded).

Float tolerance. guidekit's CFG is ``torch.lerp(u, c, w)`` and the pipelines compute ``u + w·(c − u)``;
the two round differently in the last bit. Wan's pipeline makes two forwards (cond, then uncond) where
the integration makes one batched forward, and a batched matmul rounds differently from two small ones.
Samplers and schedulers compute the same update in different orders. Comparisons therefore use a
relative tolerance of 1e-5 of the output's magnitude (observed: 0.0 to 5e-7).
"""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch

pytest.importorskip("diffusers")

import itertools

import hypothesis.strategies as st
from diffusers import (
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    DDIMScheduler,
    DDPMPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PerturbedAttentionGuidance,
    UNet2DModel,
)
from gen import layouts, pred_pairs, shapes
from hypothesis import given, settings

import guidekit as gk
from guidekit.integrations import diffusers as gkd
from guidekit.integrations.diffusers.tiny import TINY_FAMILIES, tiny_pipeline
from guidekit.ops.guidance import cfg
from guidekit.ops.shapes import to_canonical
from guidekit.strategies.base import GuidanceStrategy
from guidekit.testing import check_strategy

pytestmark = pytest.mark.diffusers

RTOL = 1e-5
STEPS = 4
PIPELINE_CLASS = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "cogvideox": "CogVideoXPipeline",
    "wan": "WanPipeline",
    "modelscope": "TextToVideoSDPipeline",
}
PREDICTION = {"sd": "eps", "sdxl": "eps", "sd3": "flow", "cogvideox": "v", "wan": "flow", "modelscope": "eps"}
LAYOUT = {"sd": "b c h w", "sdxl": "b c h w", "sd3": "b c h w", "cogvideox": "b f c h w"}
LAYOUT |= {"wan": "b c f h w", "modelscope": "b c f h w"}
BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Tiny models run faster on one thread: two threads on a busy shared CPU spin-wait (measured 50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipes() -> dict[str, tuple[Any, dict[str, Any]]]:
    torch.manual_seed(0)
    return {family: tiny_pipeline(family) for family in TINY_FAMILIES}


def _seed() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> float:
    """The max abs difference, asserted below ``rtol`` times the magnitude of ``expected``."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = float((actual.double() - expected.double()).abs().max())
    assert diff <= rtol * max(1.0, float(expected.abs().max())), diff
    return diff


class _Swap:
    """Use another scheduler on a shared pipeline for one test, restoring the original afterwards."""

    def __init__(self, pipe: Any, scheduler: Any) -> None:
        self.pipe, self.scheduler = pipe, scheduler

    def __enter__(self) -> Any:
        self.old, self.pipe.scheduler = self.pipe.scheduler, self.scheduler
        return self.pipe

    def __exit__(self, *exc: object) -> None:
        self.pipe.scheduler = self.old


def _denoisers(pipe: Any) -> list[Any]:
    return [m for m in (getattr(pipe, n, None) for n in ("unet", "transformer", "transformer_2")) if m is not None]


class _Spy:
    """Records every real denoiser forward (input latent, timestep, output) under the integration."""

    def __init__(self, pipe: Any, latent_arg: str) -> None:
        self.models, self.latent_arg, self.calls = _denoisers(pipe), latent_arg, []

    def __enter__(self) -> _Spy:
        for m in self.models:
            original = m.forward

            def spy(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                out = _original(*args, **kwargs)
                x = kwargs[self.latent_arg] if self.latent_arg in kwargs else args[0]
                t = kwargs["timestep"] if "timestep" in kwargs else args[1]
                self.calls.append((x.detach().clone(), torch.as_tensor(t).clone(), out[0].detach().clone()))
                return out

            m.forward = spy
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self.models:
            del m.forward


@dataclass(frozen=True, eq=False)
class _Record(GuidanceStrategy):
    """CFG that records what it was given (test-only, not registered)."""

    scale: float = 3.0
    log: list[tuple[torch.Tensor, torch.Tensor, gk.GuidanceContext]] = field(default_factory=list)

    def combine(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor, ctx: gk.GuidanceContext) -> torch.Tensor:
        self.log.append((pred_cond.clone(), pred_uncond.clone(), ctx))
        return cfg(pred_cond, pred_uncond, self.scale)


@dataclass(frozen=True, eq=False)
class _RecordX0(_Record):
    space: ClassVar[str] = "x0"


# -- 1. CFG through the integration == the pipeline's own CFG ------------------------------------------------
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_cfg_equals_pipeline_cfg(pipes: dict, family: str) -> None:
    pipe, kw = pipes[family]
    common = dict(kw, num_inference_steps=STEPS, output_type="latent")
    ref = pipe(**common, guidance_scale=4.5, generator=_seed())[0]
    out, info = gkd.generate(pipe, gk.CFG(4.5), **common, generator=_seed(), return_info=True)
    _close(out[0], ref)
    assert (info.family, info.prediction_type) == (PIPELINE_CLASS[family], PREDICTION[family])
    assert info.nfe == 2 * STEPS and info.forwards == STEPS
    # decoded output: the same type and the same images / frames as the pipeline's own call
    ref_out = pipe(**dict(common, output_type="pt"), guidance_scale=4.5, generator=_seed())
    out = gkd.generate(pipe, gk.CFG(4.5), **dict(common, output_type="pt"), generator=_seed())
    assert type(out) is type(ref_out)
    _close(out[0], ref_out[0], rtol=1e-4)


# -- 2. spaces, sigma and layouts the strategy sees ------------------------------------------------------------
def _expected_sigma(scheduler: Any, i: int) -> float:
    """EDM sigma of step ``i`` from the textbook formulas (methods.md §2), not from the integration."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        t = float(scheduler.sigmas[i])
        return float("inf") if t == 1.0 else t / (1 - t)
    if isinstance(scheduler, EulerDiscreteScheduler):
        return float(scheduler.sigmas[i])
    abar = float(scheduler.alphas_cumprod[int(scheduler.timesteps[i])])
    return float("inf") if abar == 0 else ((1 - abar) / abar) ** 0.5


def _textbook_x0(pred: torch.Tensor, x: torch.Tensor, space: str, sigma: float) -> torch.Tensor:
    """x0 from the model's raw output and its input x_t (methods.md §2 table)."""
    if space == "flow":
        t = 1.0 if sigma == float("inf") else sigma / (1 + sigma)
        return x - t * pred
    alpha = 0.0 if sigma == float("inf") else (1 + sigma * sigma) ** -0.5
    s = (1 - alpha * alpha) ** 0.5
    return alpha * x - s * pred if space == "v" else (x - s * pred) / alpha


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_strategy_sees_canonical_x0_and_edm_sigma(pipes: dict, family: str) -> None:
    pipe, kw = pipes[family]
    fam = gkd.FAMILIES[PIPELINE_CLASS[family]]
    strategy = _RecordX0(2.0)
    with _Spy(pipe, fam.latent_arg) as spy:
        gkd.generate(pipe, strategy, **kw, num_inference_steps=3, generator=_seed(), output_type="latent")
    assert len(strategy.log) == len(spy.calls) == 3
    for i, ((cond_x0, _, ctx), (x_in, _, out)) in enumerate(zip(strategy.log, spy.calls, strict=True)):
        sigma = _expected_sigma(pipe.scheduler, i)
        assert ctx.space == "x0" and ctx.step == i and ctx.num_steps == 3
        torch.testing.assert_close(ctx.sigma, torch.full_like(ctx.sigma, sigma), rtol=1e-6, atol=0)
        b = x_in.shape[0] // 2
        half = slice(0, b) if fam.cfg_call == "sequential" else slice(b, 2 * b)  # where the cond half sits
        expected = _textbook_x0(out[half].double(), x_in[half].double(), PREDICTION[family], sigma)
        canonical = to_canonical(expected, LAYOUT[family])
        _close(cond_x0, canonical.to(cond_x0.dtype), rtol=1e-4)


def test_video_layouts_put_channels_second(pipes: dict) -> None:
    """CogVideoX (b, f, c, h, w) and Wan/ModelScope (b, c, f, h, w) both reach strategies as (b, c, f, h, w)."""
    for family, channels in (("cogvideox", 4), ("wan", 16), ("modelscope", 4)):
        pipe, kw = pipes[family]
        strategy = _Record(2.0)
        latents = gkd.generate(pipe, strategy, **kw, num_inference_steps=2, generator=_seed(), output_type="latent")[0]
        cond, _, ctx = strategy.log[0]
        assert cond.ndim == 5 and cond.shape[1] == channels, (family, cond.shape)
        assert cond.shape == to_canonical(latents, LAYOUT[family]).shape
        assert ctx.x is not None and ctx.x.shape == cond.shape


def test_batch_of_two_is_guided_per_sample(pipes: dict) -> None:
    """Two prompts in one call: per-sample sigma, and sample 0 equals the same prompt alone (same noise)."""
    pipe, kw = pipes["sd3"]
    kw2 = {k: torch.cat([v, v + 0.5]) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    strategy = _Record(2.0)
    common = dict(num_inference_steps=2, output_type="latent")
    pair = gkd.generate(pipe, strategy, **kw2, **common, generator=_seed())[0]
    alone = gkd.generate(pipe, gk.CFG(2.0), **kw, **common, generator=_seed())[0]
    assert pair.shape[0] == 2 and all(ctx.sigma.shape == (2,) for _, _, ctx in strategy.log)
    _close(pair[:1], alone)
    assert float((pair[0] - pair[1]).abs().max()) > 1e-3


# -- 3. SAMG, APG and Interval on every family ----------------------------------------------------------------
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_samg_apg_interval_run_with_the_right_shapes(pipes: dict, family: str) -> None:
    pipe, kw = pipes[family]
    common = dict(kw, num_inference_steps=3, generator=_seed(), output_type="latent")
    shape = pipe(**common, guidance_scale=2.0)[0].shape
    for strategy in (gk.SAMG(), gk.APG(scale=5.0), gk.Interval(gk.CFG(3.0), 0.5, 5.0)):
        out = gkd.generate(pipe, strategy, **dict(common, generator=_seed()))[0]
        assert out.shape == shape and bool(torch.isfinite(out).all()), (family, strategy)
    # a strategy that differs from CFG gives a different sample (the strategy really guides)
    cfg = gkd.generate(pipe, gk.CFG(5.0), **dict(common, generator=_seed()))[0]
    apg = gkd.generate(pipe, gk.APG(scale=5.0, norm_threshold=0.0, momentum=0.0), **dict(common, generator=_seed()))[0]
    assert float((cfg - apg).abs().max()) > 1e-4


@settings(max_examples=12, deadline=None)
@given(family=st.sampled_from(TINY_FAMILIES), lo=st.integers(0, 3), width=st.integers(0, 4))
def test_interval_saves_the_expected_nfe(pipes: dict, family: str, lo: int, width: int) -> None:
    """Bounds drawn between the schedule's own sigmas: NFE = 2 inside (lo, hi], 1 outside, counted by real forwards."""
    pipe, kw = pipes[family]
    fam = gkd.FAMILIES[PIPELINE_CLASS[family]]
    pipe.scheduler.set_timesteps(STEPS)
    levels = sorted(float(s) for s in gkd.noise_schedule(pipe.scheduler)[:STEPS] if s < float("inf"))
    cuts = [0.0] + [(a + b) / 2 for a, b in itertools.pairwise(levels)] + [levels[-1] * 2]
    sigma_lo, sigma_hi = cuts[min(lo, len(cuts) - 1)], cuts[min(lo + width, len(cuts) - 1)]
    strategy = gk.Interval(gk.CFG(3.0), sigma_lo, sigma_hi)
    with _Spy(pipe, fam.latent_arg) as spy:
        _, info = gkd.generate(
            pipe, strategy, **kw, num_inference_steps=STEPS, generator=_seed(), output_type="latent", return_info=True
        )
    sigmas = gkd.noise_schedule(pipe.scheduler)[:STEPS]
    inside = [sigma_lo < float(s) <= sigma_hi for s in sigmas]
    assert info.nfe == sum(2 if g else 1 for g in inside)
    assert [u for _, _, u in info.steps] == inside
    # the real forwards: the whole [uncond; cond] batch inside the band, the conditional half (batch 1) outside
    assert [x.shape[0] for x, _, _ in spy.calls] == [2 if g else 1 for g in inside]


# -- 4. guidekit samplers drive pipelines and match the same method in diffusers ---------------------------------
SAMPLER_CASES = [
    ("sd", lambda: DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=True, steps_offset=1), "ddim", 6),
    ("sdxl", lambda: EulerDiscreteScheduler(**BETAS, timestep_spacing="leading", steps_offset=1), "euler", 6),
    ("sd", lambda: EulerDiscreteScheduler(**BETAS, timestep_spacing="trailing"), "euler", 6),
    ("sd", lambda: DPMSolverMultistepScheduler(**BETAS, solver_order=2, final_sigmas_type="zero"), "dpmpp-2m", 6),
    ("sd", lambda: HeunDiscreteScheduler(**BETAS), "heun", 4),
    ("sd3", lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), "flow-euler", 6),
    ("wan", lambda: FlowMatchEulerDiscreteScheduler(shift=7.0), "flow-euler", 6),
    ("cogvideox", None, "ddim", 5),  # CogVideoXDDIMScheduler, v-prediction, zero terminal SNR
    ("modelscope", lambda: DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=True, steps_offset=1), "ddim", 4),
]


@pytest.mark.parametrize(("family", "make_scheduler", "sampler", "steps"), SAMPLER_CASES, ids=lambda v: str(v))
def test_guidekit_sampler_matches_diffusers_scheduler(pipes: dict, family, make_scheduler, sampler, steps) -> None:
    pipe, kw = pipes[family]
    scheduler = pipe.scheduler if make_scheduler is None else make_scheduler()
    common = dict(kw, num_inference_steps=steps, output_type="latent")
    with _Swap(pipe, scheduler):
        ref, ref_info = gkd.generate(pipe, gk.CFG(3.0), **common, generator=_seed(), return_info=True)
        out, info = gkd.generate(pipe, gk.CFG(3.0), sampler=sampler, **common, generator=_seed(), return_info=True)
        assert pipe.scheduler is scheduler  # restored after the stand-in
    _close(out[0], ref[0])
    assert info.nfe == ref_info.nfe and info.sampler == sampler


def test_euler_and_flow_euler_agree_on_a_flow_model(pipes: dict) -> None:
    """DDIM = VE Euler = flow Euler (methods.md §2): two guidekit samplers, one pipeline."""
    pipe, kw = pipes["sd3"]
    common = dict(kw, num_inference_steps=5, output_type="latent")
    a = gkd.generate(pipe, gk.CFG(3.0), sampler="euler", **common, generator=_seed())[0]
    b = gkd.generate(pipe, gk.CFG(3.0), sampler="flow-euler", **common, generator=_seed())[0]
    _close(a, b)


def test_a_diffusers_scheduler_passed_as_sampler_is_used_and_restored(pipes: dict) -> None:
    pipe, kw = pipes["sd"]
    original = pipe.scheduler
    euler = EulerDiscreteScheduler(**BETAS, timestep_spacing="trailing")
    common = dict(kw, num_inference_steps=5, output_type="latent")
    out = gkd.generate(pipe, gk.CFG(3.0), sampler=euler, **common, generator=_seed())[0]
    assert pipe.scheduler is original
    with _Swap(pipe, euler):
        ref = pipe(**common, guidance_scale=3.0, generator=_seed())[0]
    _close(out, ref)


def test_cfgpp_needs_a_guidekit_sampler(pipes: dict) -> None:
    pipe, kw = pipes["sd"]
    common = dict(kw, num_inference_steps=3, output_type="latent")
    with pytest.raises(gk.ConfigError, match="sampler"):
        gkd.generate(pipe, gk.CFGPlusPlus(0.6), **common, generator=_seed())
    out = gkd.generate(pipe, gk.CFGPlusPlus(0.6), sampler="ddim", **common, generator=_seed())[0]
    assert bool(torch.isfinite(out).all())


# -- 5. negative prompts are the unconditional branch -------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd", "sdxl", "modelscope"])
def test_negative_prompt_is_the_unconditional_branch(pipes: dict, family: str) -> None:
    pipe, kw = pipes[family]
    common = dict(kw, num_inference_steps=3, output_type="latent")
    ref = pipe(**common, negative_prompt="a dog", guidance_scale=4.0, generator=_seed())[0]
    out = gkd.generate(pipe, gk.CFG(4.0), **common, negative_prompt="a dog", generator=_seed())[0]
    plain = gkd.generate(pipe, gk.CFG(4.0), **common, generator=_seed())[0]
    _close(out, ref)
    assert float((out - plain).abs().max()) > 1e-3


def test_negative_prompt_equals_its_embeddings(pipes: dict) -> None:
    pipe, kw = pipes["sd"]
    cond, uncond = pipe.encode_prompt("a cat", "cpu", 1, True, negative_prompt="a dog")
    common = dict(num_inference_steps=3, output_type="latent", height=kw["height"], width=kw["width"])
    a = gkd.generate(pipe, gk.CFG(4.0), prompt="a cat", negative_prompt="a dog", **common, generator=_seed())[0]
    b = gkd.generate(pipe, gk.CFG(4.0), prompt_embeds=cond, negative_prompt_embeds=uncond, **common, generator=_seed())
    assert torch.equal(a, b[0])


# -- 6. adapters both ways -----------------------------------------------------------------------------------
def _modular_loop(guider: Any, preds: list[tuple[torch.Tensor, torch.Tensor]], scheduler: Any) -> list[Any]:
    """What a modular denoise block does each step: set_state, prepare_inputs, one pass per batch, combine."""
    outs = []
    for i, (cond, uncond) in enumerate(preds):
        guider.set_state(step=i, num_inference_steps=len(preds), timestep=scheduler.timesteps[i])
        batches = guider.prepare_inputs({"prompt_embeds": (torch.zeros(1), torch.ones(1))})
        for batch in batches:
            batch.noise_pred = cond if batch.prompt_embeds.item() == 0 else uncond
        outs.append((len(batches), guider(batches).pred))
    return outs


@st.composite
def _runs(draw: Any) -> tuple[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    layout = draw(layouts().filter(lambda lay: "c" in lay.split()[:3]))
    shape = draw(shapes(layout, max_side=5, max_batch=2))
    steps = draw(st.integers(2, 5))
    pairs = [draw(pred_pairs(shape, dtype=torch.float32)) for _ in range(steps)]
    return layout, pairs


@settings(max_examples=25, deadline=None)
@given(run=_runs(), scale=st.floats(0.0, 12.0), window=st.tuples(st.floats(0.0, 0.9), st.floats(0.0, 1.0)))
def test_guidekit_cfg_as_a_guider_equals_diffusers_cfg(run: Any, scale: float, window: tuple[float, float]) -> None:
    layout, pairs = run
    start, stop = window[0], max(window)
    scheduler = DDIMScheduler(**BETAS)
    scheduler.set_timesteps(len(pairs))
    ours = gkd.GuidekitGuider(gk.CFG(scale), scheduler=scheduler, layout=layout, start=start, stop=stop)
    theirs = ClassifierFreeGuidance(guidance_scale=scale, start=start, stop=stop)
    for (n_ours, out_ours), (n_theirs, out_theirs) in zip(
        _modular_loop(ours, pairs, scheduler), _modular_loop(theirs, pairs, scheduler), strict=True
    ):
        assert n_ours == n_theirs or math.isclose(scale, 1.0)
        _close(out_ours, out_theirs)


@settings(max_examples=25, deadline=None)
@given(
    run=_runs(),
    scale=st.floats(1.5, 12.0),
    eta=st.floats(0.0, 1.0),
    threshold=st.sampled_from([0.0, 0.5, 3.0, 50.0]),
    momentum=st.sampled_from([0.0, -0.5, -0.75]),
)
def test_guidekit_apg_as_a_guider_equals_diffusers_apg(run: Any, scale, eta, threshold, momentum) -> None:
    """Paper APG ``c + (w-1)·update`` == diffusers' ``use_original_formulation`` at scale ``w - 1`` (on x0)."""
    layout, pairs = run
    scheduler = DDIMScheduler(**BETAS, prediction_type="sample")
    scheduler.set_timesteps(len(pairs))
    apg = gk.APG(scale=scale, eta=eta, norm_threshold=threshold, momentum=momentum)
    ours = gkd.GuidekitGuider(apg, scheduler=scheduler, layout=layout)
    theirs = AdaptiveProjectedGuidance(
        guidance_scale=scale - 1,
        adaptive_projected_guidance_momentum=momentum or None,
        adaptive_projected_guidance_rescale=threshold,
        eta=eta,
        use_original_formulation=True,
    )
    canonical = [(to_canonical(c, layout), to_canonical(u, layout)) for c, u in pairs]
    for (_, out_ours), (_, out_theirs) in zip(
        _modular_loop(ours, pairs, scheduler), _modular_loop(theirs, canonical, scheduler), strict=True
    ):
        _close(to_canonical(out_ours, layout), out_theirs, rtol=1e-4)


def test_guidekit_guider_config_round_trips(tmp_path: Any) -> None:
    strategy = gk.Interval(gk.APG(scale=7.0), 0.3, 4.0)
    guider = gkd.GuidekitGuider(strategy, prediction_type="sample", layout="b f c h w")
    guider.save_pretrained(tmp_path)
    loaded = gkd.GuidekitGuider.from_pretrained(tmp_path)
    assert loaded.strategy == strategy and loaded.layout == "b f c h w" and loaded.scheduler is None
    loaded.set_state(step=0, num_inference_steps=2, timestep=torch.tensor(999))
    with pytest.raises(gk.ConfigError, match="scheduler"):
        loaded.num_conditions  # noqa: B018


def test_guider_refusals() -> None:
    scheduler = DDIMScheduler(**BETAS)  # epsilon
    with pytest.raises(gk.ConfigError, match="x0"):
        gkd.GuidekitGuider(gk.APG(), scheduler=scheduler, prediction_type="epsilon")
    with pytest.raises(gk.ConfigError, match="pred_cond_skip"):
        gkd.DiffusersGuidance(PerturbedAttentionGuidance(perturbed_guidance_layers=[0]))
    with pytest.raises(gk.ConfigError, match="guider"):
        gkd.DiffusersGuidance(guider="cfg")


@settings(max_examples=25, deadline=None)
@given(run=_runs(), scale=st.floats(0.0, 12.0))
def test_diffusers_cfg_guider_as_a_strategy_equals_guidekit_cfg(run: Any, scale: float) -> None:
    layout, pairs = run
    ours, theirs = gk.CFG(scale), gkd.DiffusersGuidance(ClassifierFreeGuidance(guidance_scale=scale))
    for c, u in pairs:
        c, u = to_canonical(c, layout), to_canonical(u, layout)
        _close(theirs(c, u), ours(c, u))


def test_diffusers_apg_guider_as_a_strategy_keeps_momentum_once_per_step() -> None:
    """Same numbers as gk.APG over a run, and a corrector evaluation does not advance the momentum."""
    torch.manual_seed(0)
    theirs = gkd.DiffusersGuidance(
        AdaptiveProjectedGuidance(
            guidance_scale=4.0, adaptive_projected_guidance_momentum=-0.5, eta=0.0, use_original_formulation=True
        )
    )
    ours = gk.APG(scale=5.0, eta=0.0, norm_threshold=15.0, momentum=-0.5)
    pairs = [(torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 6)) for _ in range(4)]
    s_theirs, s_ours = theirs.init_state(pairs[0][0]), ours.init_state(pairs[0][0])
    for i, (c, u) in enumerate(pairs):
        ctx = gk.GuidanceContext.default(c).replace(step=i, num_steps=4, space="x0")
        _, after = theirs.step(c, u, ctx.replace(substep=1), s_theirs)
        assert after is s_theirs  # a corrector keeps the state
        g_theirs, s_theirs = theirs.step(c, u, ctx, s_theirs)
        g_ours, s_ours = ours.step(c, u, ctx, s_ours)
        _close(g_theirs, g_ours, rtol=1e-4)
    assert theirs.guider.momentum_buffer is None  # the wrapped guider itself was never touched


def test_diffusers_guiders_pass_the_strategy_contract() -> None:
    check_strategy(gkd.DiffusersGuidance(ClassifierFreeGuidance(guidance_scale=3.0)))
    check_strategy(gkd.DiffusersGuidance(AdaptiveProjectedGuidance(guidance_scale=3.0, eta=0.5)))


def test_diffusers_guider_drives_a_pipeline_like_guidekit_cfg(pipes: dict) -> None:
    pipe, kw = pipes["cogvideox"]
    common = dict(kw, num_inference_steps=3, output_type="latent")
    a = gkd.generate(
        pipe, gkd.DiffusersGuidance(ClassifierFreeGuidance(guidance_scale=5.0)), **common, generator=_seed()
    )
    b = gkd.generate(pipe, gk.CFG(5.0), **common, generator=_seed())
    _close(a[0], b[0])


# -- 7. bad input ------------------------------------------------------------------------------------------------
def test_unsupported_pipeline_lists_the_supported_ones() -> None:
    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(4, 8),
        norm_num_groups=2,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with pytest.raises(gk.ConfigError) as err:
        gkd.generate(DDPMPipeline(unet=unet, scheduler=DDIMScheduler()), gk.CFG(3.0))
    assert "DDPMPipeline" in str(err.value)
    assert all(name in str(err.value) for name in PIPELINE_CLASS.values())


class _Unlabelled(DDIMScheduler):
    """A DDIM (epsilon) scheduler whose config does not say what the model predicts, like a custom scheduler."""

    def step(self, *args: Any, **kwargs: Any) -> Any:
        self.register_to_config(prediction_type="epsilon")
        try:
            return super().step(*args, **kwargs)
        finally:
            self.register_to_config(prediction_type=None)


def test_x0_strategy_without_a_prediction_type_is_refused(pipes: dict) -> None:
    pipe, kw = pipes["sd"]
    unknown = _Unlabelled(**BETAS, clip_sample=False, steps_offset=1)
    unknown.register_to_config(prediction_type=None)
    assert gkd.prediction_space(unknown) is None
    common = dict(kw, num_inference_steps=2, output_type="latent")
    with _Swap(pipe, unknown):
        with pytest.raises(gk.ConfigError, match="prediction_type"):
            gkd.generate(pipe, gk.APG(scale=5.0), **common, generator=_seed())
        with pytest.raises(gk.ConfigError, match="prediction_type"):
            gkd.generate(pipe, gk.CFG(3.0), sampler="euler", **common, generator=_seed())
        cfg = gkd.generate(pipe, gk.CFG(3.0), **common, generator=_seed())[0]  # linear: needs no space
        apg = gkd.generate(pipe, gk.APG(scale=5.0), prediction_type="eps", **common, generator=_seed())[0]
    with _Swap(pipe, DDIMScheduler(**BETAS, clip_sample=False, steps_offset=1)):
        _close(cfg, gkd.generate(pipe, gk.CFG(3.0), **common, generator=_seed())[0])
        _close(apg, gkd.generate(pipe, gk.APG(scale=5.0), **common, generator=_seed())[0])


def test_mismatched_batches_are_refused(pipes: dict) -> None:
    pipe, kw = pipes["wan"]
    bad = dict(kw, prompt_embeds=torch.cat([kw["prompt_embeds"]] * 2))
    with pytest.raises(gk.ShapeError, match="negative_prompt_embeds: expected the batch size of prompt_embeds"):
        gkd.generate(pipe, gk.CFG(3.0), **bad, num_inference_steps=2, output_type="latent")
    pipe, kw = pipes["sd3"]
    bad = dict(kw, pooled_prompt_embeds=torch.cat([kw["pooled_prompt_embeds"]] * 3))
    with pytest.raises(gk.ShapeError, match="negative_pooled_prompt_embeds"):
        gkd.generate(pipe, gk.CFG(3.0), **bad, num_inference_steps=2, output_type="latent")


def test_guidance_arguments_for_the_pipeline_are_refused(pipes: dict) -> None:
    pipe, kw = pipes["sd"]
    with pytest.raises(gk.ConfigError, match="guidance_scale: expected the strategy"):
        gkd.generate(pipe, gk.CFG(3.0), **kw, guidance_scale=7.5)
    with pytest.raises(gk.ConfigError, match="guidance_rescale"):
        gkd.generate(pipe, gk.CFG(3.0), **kw, guidance_rescale=0.7)
    with pytest.raises(gk.ConfigError, match="strategy"):
        gkd.generate(pipe, "cfg", **kw)  # type: ignore[arg-type]
    with pytest.raises(gk.UnknownNameError, match="euler"):
        gkd.generate(pipe, gk.CFG(3.0), sampler="eulr", **kw)
    with pytest.raises(gk.ConfigError, match="weak model"):
        gkd.generate(pipe, gk.AutoGuidance(), **kw)


def test_pipeline_is_restored_after_an_error(pipes: dict) -> None:
    pipe, kw = pipes["sd"]
    scheduler = pipe.scheduler

    @dataclass(frozen=True)
    class Broken(GuidanceStrategy):
        def combine(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor, ctx: Any) -> torch.Tensor:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        gkd.generate(pipe, Broken(), **kw, num_inference_steps=2, sampler="euler")
    assert "forward" not in pipe.unet.__dict__ and pipe.scheduler is scheduler


def test_subclasses_are_supported_and_families_can_be_registered(pipes: dict) -> None:
    pipe, kw = pipes["sd3"]
    common = dict(kw, num_inference_steps=2, output_type="latent")
    ref = gkd.generate(pipe, gk.CFG(3.0), **common, generator=_seed())[0]

    class MyPipeline(type(pipe)):  # a user's subclass: matched through its MRO
        pass

    sub = MyPipeline(**pipe.components)
    sub.set_progress_bar_config(disable=True)
    assert gkd.family_of(sub)[0] == "StableDiffusion3Pipeline"
    with pytest.raises(gk.ConfigError, match="already registered"):
        gkd.register_family("StableDiffusion3Pipeline", gkd.FAMILIES["StableDiffusion3Pipeline"])
    gkd.register_family(MyPipeline, gkd.Family(("transformer",), "b c f h w", "hidden_states"))
    try:
        with pytest.raises(gk.LayoutError, match="denoiser latent"):  # a wrong row is caught at the first call
            gkd.generate(sub, gk.CFG(3.0), **common, generator=_seed())
        gkd.register_family(MyPipeline, gkd.Family(("transformer",), "b c h w", "hidden_states"), override=True)
        _close(gkd.generate(sub, gk.CFG(3.0), **common, generator=_seed())[0], ref)
    finally:
        gkd.FAMILIES.pop("MyPipeline")


@pytest.mark.parametrize("family", ["sd3", "cogvideox"])
def test_x0_energy_samg_at_the_pure_noise_step(pipes: dict, family: str) -> None:
    pipe, kw = pipes[family]
    strategy = gk.SAMG(energy=gk.energy.X0DeltaSquared())
    out = gkd.generate(pipe, strategy, **kw, num_inference_steps=2, output_type="latent", generator=_seed())[0]
    assert bool(torch.isfinite(out).all())


def test_importing_guidekit_does_not_import_diffusers() -> None:
    code = "import sys, guidekit, guidekit.integrations; assert 'diffusers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_diffusers_apg_guider_through_the_engine_on_heun_equals_guidekit_apg() -> None:
    """The corrector is handed the predictor's state; the wrapped guider combines with its start-of-step copy."""
    from guidekit.oracle import GaussianMixture
    from guidekit.samplers import EDMModel, karras_sigmas, sample_heun

    gm = GaussianMixture.random(num_classes=3, components=2, event_shape=(2, 3, 3), spread=2.0, std=0.4, seed=7)
    model = EDMModel(gm.as_model("edm"))
    labels, unconds = torch.tensor([0, 1, 2]), torch.full((3,), -1)
    theirs = gkd.DiffusersGuidance(
        AdaptiveProjectedGuidance(
            guidance_scale=3.0, adaptive_projected_guidance_momentum=-0.5, eta=0.0, use_original_formulation=True
        )
    )
    ours = gk.APG(scale=4.0, eta=0.0, norm_threshold=15.0, momentum=-0.5)
    sigmas = karras_sigmas(8)
    x = model.initial_x(torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64), 80.0)
    out = [sample_heun(gk.guided(model, s, labels, unconds), x, sigmas) for s in (theirs, ours)]
    _close(out[0], out[1], rtol=1e-9)
