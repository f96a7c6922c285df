"""The engine: one implementation of the evaluation rules, the same result from every front-end.

* NFE counted from the plan equals the network rows actually evaluated, for every registered strategy and
  every sampler it supports.
* The native loop and the diffusers modular guider give bit-identical samples for every registered
  strategy; a diffusers pipeline run through the engine equals the same pipeline driven by the guider.
* Branches an inner strategy adds pass through every combinator; perturbations a backend cannot apply are
  refused by name; a weak model is needed exactly by the strategies that plan it.
* A run restarted on the same denoiser starts afresh; two threads on one denoiser are refused.
* No hook is probed with ``getattr`` anywhere in the package.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import guidekit as gk
from guidekit.engine import Engine, NativeBackend, Position
from guidekit.ops.timesteps import karras_sigmas
from guidekit.oracle import UNCOND, GaussianMixture
from guidekit.samplers import EDMModel, FlowModel, VPModel, sample_euler, sample_heun
from guidekit.testing import example_strategy

GM = GaussianMixture.random(num_classes=3, components=2, event_shape=(2, 3, 3), spread=2.0, std=0.4, seed=7)
LABELS = torch.tensor([0, 1, 2])
UNCONDS = torch.full((3,), UNCOND)
SIGMAS = karras_sigmas(6, 0.002, 80.0)
ROOT = Path(__file__).resolve().parent.parent


def x_T(seed: int = 0) -> Tensor:
    return torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


class Counting:
    """A native model that counts the rows it evaluates."""

    def __init__(self, model: Any) -> None:
        self.model, self.rows, self.calls = model, 0, 0

    def __call__(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        self.rows += x.shape[0]
        self.calls += 1
        return self.model(x, t, cond)


def registered() -> list[str]:
    return gk.strategies.names()


def cases(reason: Any) -> list[Any]:
    """Every registered strategy, skipped (with the reason) where ``reason(strategy)`` names one."""
    out = []
    for name in registered():
        why = reason(example_strategy(name))
        out.append(pytest.param(name, marks=pytest.mark.skip(reason=why)) if why else name)
    return out


def native_limits(s: gk.GuidanceStrategy) -> str | None:
    return (
        "plans a perturbed or observed forward, which needs an nn.Module (the oracle is a function)"
        if bool(s.perturbations() or s.observers())
        else None
    )


def weak_for(strategy: gk.GuidanceStrategy, make: Any) -> Any:
    return make() if "weak" in strategy.models() else None


# -- NFE = rows evaluated -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp-2m", "ddim", "euler-ancestral"])
@pytest.mark.parametrize("name", cases(native_limits))
def test_nfe_counted_from_the_plan_equals_the_rows_evaluated(name, sampler):
    strategy = example_strategy(name)
    main = Counting(GM.as_model("edm"))
    weak = Counting(GaussianMixture.random(3, 2, (2, 3, 3), spread=1.0, std=0.6, seed=8).as_model("edm"))
    den = gk.guided(
        EDMModel(main), strategy, LABELS, UNCONDS, weak_model=EDMModel(weak) if "weak" in strategy.models() else None
    )
    run = gk.samplers.get(sampler)
    run(den, EDMModel(main).initial_x(x_T(), SIGMAS[0]), SIGMAS, generator=torch.Generator().manual_seed(1))
    assert den.nfe * 3 == main.rows + weak.rows
    assert den.forwards == main.calls + weak.calls


def test_nfe_of_zero_init_steps_is_zero_on_a_flow_model():
    model = Counting(GM.as_model("flow"))
    records: list[gk.StepRecord] = []
    gk.sample(
        model, x_T(), sampler="flow-euler", steps=6, strategy=gk.CFGZeroStar(4.0, zero_init_steps=2), cond=LABELS,
        uncond=UNCONDS, prediction="flow", progress=False, callback=records.append,
    )  # fmt: skip
    assert [r.model_called for r in records] == [False, False, True, True, True, True]
    assert records[-1].nfe * 3 == model.rows == 4 * 2 * 3


# -- one rule, every front-end: native loop vs modular guider ----------------------------------------------
def guider_denoiser(strategy: gk.GuidanceStrategy, adapter: VPModel, scheduler: Any) -> Any:
    """A guidekit denoiser built from the modular guider: the model runs as a modular pipeline would run it
    (``[cond; uncond]`` in one batch when ``num_conditions`` is 2), the guider combines."""
    from guidekit.integrations.diffusers import GuidekitGuider

    guider = GuidekitGuider(strategy, scheduler=scheduler)
    timesteps = scheduler.timesteps

    def denoise(x: Tensor, sigma: Tensor, info: gk.samplers.StepInfo) -> Tensor:
        guider.set_state(info.step, info.num_steps, timesteps[info.step + info.substep])
        if guider.num_conditions == 2:
            pred = adapter.predict(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([LABELS, UNCONDS]))
            c, u = pred[:3], pred[3:]
        else:
            c, u = adapter.predict(x, sigma, LABELS), None
        return guider.forward(c, u).pred  # the model predicts x0

    return denoise


def guider_limits(s: gk.GuidanceStrategy) -> str | None:
    if s.perturbations() or s.observers():
        return (
            "plans a perturbed or observed forward: this loop runs cond/uncond (test_diffusers_perturbations "
            "drives those)"
        )
    if "weak" in s.models():
        return "evaluates a weak model, which a modular pipeline does not run"
    if s.sampler_coupled:
        return "sampler-coupled: re-noises inside the sampler update, which a guider cannot do"
    return None


def native_guider_limits(s: gk.GuidanceStrategy) -> str | None:
    if s.reads_condition():
        return "reads ctx.condition (class labels), which a modular guider never sees (it falls back there)"
    return guider_limits(s)


def pipeline_guider_limits(s: gk.GuidanceStrategy) -> str | None:
    if s.space not in ("any", "native"):
        return "works in x0 space: a guider never sees x_t to convert eps predictions"
    return guider_limits(s)


@pytest.mark.diffusers
@pytest.mark.parametrize("sampler", [sample_euler, sample_heun], ids=["euler", "heun"])
@pytest.mark.parametrize("name", cases(native_guider_limits))
def test_native_loop_and_modular_guider_agree_bit_for_bit(name, sampler):
    from diffusers import EulerDiscreteScheduler

    from guidekit.integrations.diffusers.families import noise_schedule

    scheduler = EulerDiscreteScheduler(prediction_type="sample")
    scheduler.set_timesteps(6)
    sigmas = noise_schedule(scheduler)
    strategy = example_strategy(name)
    adapter = VPModel(GM.as_model("x0", alphas_cumprod=scheduler.alphas_cumprod), scheduler.alphas_cumprod, "x0")
    x = adapter.initial_x(x_T(), sigmas[0])
    native = sampler(gk.guided(adapter, strategy, LABELS, UNCONDS), x, sigmas)
    via_guider = sampler(guider_denoiser(strategy, adapter, scheduler), x, sigmas)
    assert torch.equal(native, via_guider), float((native - via_guider).abs().max())


# -- one rule, every front-end: a pipeline through the engine vs the same pipeline driven by the guider -------
@pytest.fixture(scope="module")
def sd() -> Any:
    pytest.importorskip("diffusers")
    from guidekit.integrations.diffusers.tiny import tiny_pipeline

    pipe, kw = tiny_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe, kw


@pytest.mark.diffusers
@pytest.mark.parametrize("name", cases(pipeline_guider_limits))
def test_pipeline_through_the_engine_equals_the_pipeline_driven_by_the_guider(sd, name):
    from guidekit.integrations.diffusers import GuidekitGuider, generate

    pipe, kw = sd
    strategy, steps = example_strategy(name), 5
    latents = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    ours = generate(
        pipe, strategy, num_inference_steps=steps, latents=latents.clone(), negative_prompt="", output_type="latent",
        **kw,
    ).images  # fmt: skip
    # the same denoising loop, written as a modular pipeline runs it, with the guider combining
    cond, uncond = pipe.encode_prompt(kw["prompt"], "cpu", 1, True, negative_prompt="")
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    guider = GuidekitGuider(strategy, scheduler=scheduler)
    x = latents.clone() * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        guider.set_state(i, steps, t)
        if guider.num_conditions == 2:
            pred = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond]), return_dict=False)[
                0
            ]
            u, c = pred.chunk(2)
        else:
            c, u = pipe.unet(x, t, encoder_hidden_states=cond, return_dict=False)[0], None
        x = scheduler.step(guider.forward(c, u).pred, t, x, return_dict=False)[0]
    assert torch.equal(ours, x), float((ours - x).abs().max())


# -- branches through combinators -----------------------------------------------------------------------------
NEGATIVE = gk.Branch("negative", condition="negative")


@dataclass(frozen=True)
class AwayFromNegative(gk.GuidanceStrategy):
    """A three-branch strategy: CFG plus a push away from a second negative condition."""

    scale: float = 3.0
    push: float = 0.5

    def branches(self, ctx, state):
        return (gk.COND, gk.UNCOND, NEGATIVE)

    def combine(self, pred_cond, pred_uncond, ctx):
        return gk.ops.guidance.cfg(pred_cond, pred_uncond, self.scale)

    def combine_branches(self, preds, ctx, state):
        c = preds["cond"]
        return self.combine(c, preds["uncond"], ctx) + self.push * (c - preds["negative"]), state


WRAPS = {
    "interval": lambda s: gk.Interval(s, sigma_lo=0.0, sigma_hi=None),
    "rescale": lambda s: gk.Rescale(s, phi=0.0),
    "ramp": lambda s: gk.Ramp(s),
    "nested": lambda s: gk.Rescale(gk.Interval(s, 0.0, None), 0.0),
}


@pytest.mark.parametrize("wrap", list(WRAPS))
def test_a_branch_added_by_an_inner_strategy_passes_through_combinators(wrap):
    model = Counting(GM.as_model("edm"))
    negatives = torch.tensor([2, 0, 1])
    extra = {"negative": negatives}

    def run(strategy: gk.GuidanceStrategy) -> Tensor:
        den = gk.guided(EDMModel(model), strategy, LABELS, UNCONDS, conditions=extra)
        out = sample_euler(den, EDMModel(model).initial_x(x_T(), SIGMAS[0]), SIGMAS)
        assert den.records[0].branches == ("cond", "uncond", "negative")
        return out

    wrapped = run(WRAPS[wrap](AwayFromNegative()))
    assert model.calls == 6 and model.rows == 6 * 9  # one forward of [cond; uncond; negative] per step
    if wrap != "ramp":  # the others are exact no-ops around the inner strategy here
        assert torch.equal(wrapped, run(AwayFromNegative()))


def test_a_condition_the_plan_names_must_be_given():
    den = gk.guided(EDMModel(GM.as_model("edm")), AwayFromNegative(), LABELS, UNCONDS)
    with pytest.raises(gk.ConfigError, match="conditions: expected a condition named 'negative'"):
        sample_euler(den, x_T(), SIGMAS)


# -- perturbations and models ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SkipLayers(gk.Perturbation):
    kind = "skip-layers"


@dataclass(frozen=True)
class Perturbed(gk.CFG):
    perturbation: gk.Perturbation = gk.NoPerturbation()  # noqa: RUF009

    def branches(self, ctx, state):
        return (gk.COND, gk.Branch("perturbed", perturbation=self.perturbation))

    def combine_branches(self, preds, ctx, state):
        return self.combine(preds["cond"], preds["perturbed"], ctx), state


def test_an_unsupported_perturbation_is_refused_by_name():
    den = gk.guided(EDMModel(GM.as_model("edm")), Perturbed(perturbation=SkipLayers(("mid",))), LABELS, UNCONDS)
    supported = r"\['blurred-queries', 'identity-self-attention', 'none', 'normalized-attention', 'skip-blocks'\]"
    with pytest.raises(gk.ConfigError, match=rf"perturbation: NativeBackend supports {supported}, got 'skip-layers'"):
        sample_euler(den, x_T(), SIGMAS)


def test_the_identity_perturbation_is_the_plain_forward_in_one_batch():
    model = Counting(GM.as_model("edm"))
    den = gk.guided(EDMModel(model), Perturbed(scale=3.0), LABELS, UNCONDS)
    out = sample_euler(den, EDMModel(model).initial_x(x_T(), SIGMAS[0]), SIGMAS)
    assert model.calls == 6  # cond and the no-op perturbed branch share one forward
    plain = gk.guided(EDMModel(GM.as_model("edm")), gk.CFG(3.0), LABELS, LABELS)  # perturbed = cond's condition
    assert torch.equal(out, sample_euler(plain, EDMModel(model).initial_x(x_T(), SIGMAS[0]), SIGMAS))


def test_a_weak_model_is_needed_exactly_where_a_plan_names_it():
    model = EDMModel(GM.as_model("edm"))
    with pytest.raises(gk.ConfigError, match="weak_model: expected the weak model"):
        gk.guided(model, gk.Interval(gk.AutoGuidance()), LABELS, UNCONDS)
    with pytest.raises(gk.ConfigError, match="weak_model: expected None, since CFG never evaluates"):
        gk.guided(model, gk.CFG(3.0), LABELS, UNCONDS, weak_model=model)


# -- runs and threads -------------------------------------------------------------------------------------
def test_a_restarted_run_starts_from_a_fresh_state_and_count():
    model = EDMModel(GM.as_model("edm"))
    den = gk.guided(model, gk.APG(scale=4.0, momentum=-0.5, norm_threshold=0.0), LABELS, UNCONDS)
    x = model.initial_x(x_T(), SIGMAS[0])
    first = sample_euler(den, x, SIGMAS)
    nfe = den.nfe
    second = sample_euler(den, x, SIGMAS)
    assert torch.equal(first, second) and den.nfe == nfe == 12
    assert [r.step for r in den.records] == list(range(6))


def test_two_threads_on_one_denoiser_are_refused():
    gate, release = threading.Event(), threading.Event()

    def slow(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        gate.set()
        release.wait(5)
        return GM.as_model("edm")(x, t, cond)

    den = gk.guided(EDMModel(slow), gk.CFG(3.0), LABELS, UNCONDS)
    info = gk.samplers.StepInfo(0, 6, SIGMAS)
    worker = threading.Thread(target=den, args=(x_T(), SIGMAS[:1].expand(3), info))
    worker.start()
    gate.wait(5)
    try:
        with pytest.raises(gk.GuidekitError, match="engine: expected one evaluation at a time"):
            den(x_T(), SIGMAS[:1].expand(3), info)
    finally:
        release.set()
        worker.join()


def test_the_engine_plans_without_a_sample_for_a_guider_and_completes_with_predictions():
    engine = Engine(gk.Interval(gk.CFG(3.0), 1.0, 10.0), NativeBackend({"main": EDMModel(GM.as_model("edm"))}), {})
    inside, outside = Position(0, 2, step_sigma=5.0), Position(1, 2, step_sigma=0.5)
    assert [b.name for b in engine.preview(torch.ones(1), inside)] == ["cond", "uncond"]
    assert [b.name for b in engine.preview(torch.ones(1), outside)] == ["cond"]
    c, u = x_T(1), x_T(2)
    out = engine.complete(engine.plan(None, torch.full((3,), 5.0), inside, like=c), {"cond": c, "uncond": u})
    assert torch.equal(out.guided, gk.ops.guidance.cfg(c, u, 3.0)) and engine.nfe == 2


# -- one protocol, declared --------------------------------------------------------------------------------
def test_no_hook_is_probed_with_getattr():
    hooks = r"skips_model|renoise_prediction|requires_weak_model|contract_example|contract_exempt|sampler_coupled"
    pattern = re.compile(rf"getattr\(.*({hooks})")
    hits = [
        f"{path.relative_to(ROOT)}:{i}"
        for path in (ROOT / "guidekit").rglob("*.py")
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []


def test_flow_and_vp_models_share_the_engine():
    for adapter in (FlowModel(GM.as_model("flow")), VPModel(GM.as_model("v"), prediction="v")):
        den = gk.guided(adapter, gk.APG(scale=3.0), LABELS, UNCONDS)
        assert den.space == "x0" and den.engine.backend.prediction("main") == adapter.prediction


# -- memory: max_batch ---------------------------------------------------------------------------------------
def test_max_batch_splits_a_plan_into_smaller_forwards_with_the_same_result_and_nfe():
    negatives = torch.tensor([2, 0, 1])
    runs = {}
    for max_batch in (None, 6, 3):
        model = Counting(GM.as_model("edm"))
        den = gk.guided(EDMModel(model), AwayFromNegative(), LABELS, UNCONDS, conditions={"negative": negatives},
                        max_batch=max_batch)  # fmt: skip
        runs[max_batch] = (sample_euler(den, EDMModel(model).initial_x(x_T(), SIGMAS[0]), SIGMAS), den, model)
    (full, den_full, m_full), (two, den_two, m_two), (one, den_one, m_one) = runs.values()
    assert den_full.nfe == den_two.nfe == den_one.nfe == 18
    assert (m_full.calls, m_two.calls, m_one.calls) == (6, 12, 18)  # 3 branches: 1, 2 and 3 forwards a step
    assert torch.allclose(full, two, atol=1e-12) and torch.allclose(full, one, atol=1e-12)
    with pytest.raises(gk.ConfigError, match=r"max_batch: expected at least the rows of one branch \(3 rows"):
        sample_euler(gk.guided(EDMModel(GM.as_model("edm")), gk.CFG(3.0), LABELS, UNCONDS, max_batch=2), x_T(), SIGMAS)
    with pytest.raises(gk.ConfigError, match="max_batch: expected None or an integer >= 1"):
        gk.guided(EDMModel(GM.as_model("edm")), gk.CFG(3.0), LABELS, UNCONDS, max_batch=0)
