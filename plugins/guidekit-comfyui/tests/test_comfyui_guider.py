"""The Guidekit Guider against the real ComfyUI (the vendored snapshot in CI): parity, NFE and the state rule."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import torch
from comfyui_harness import Tiny, example, import_comfy, noise, one_thread, require, schedule, tiny_model, why_not

import guidekit as gk
from guidekit.errors import ConfigError
from guidekit.registry import SAMPLERS, STRATEGIES
from guidekit.samplers import EDMModel

require()

SAMPLER_PAIRS = [("euler", "euler"), ("heun", "heun"), ("dpmpp_2m", "dpmpp-2m")]
"""ComfyUI's sampler name -> guidekit's."""


REASONS = {name: why for name in STRATEGIES.names() if (why := why_not(name)) is not None}
NOT_A_GUIDER = {name: why for name, why in REASONS.items() if why not in ("perturbation", "condition")}
"""Refused by the guider. Perturbation strategies run (in ComfyUI's layer names; the native engine here has no
module to perturb): test_comfyui_perturbations compares them with ComfyUI's own nodes."""


@pytest.fixture(scope="module")
def tiny() -> Iterator[Tiny]:
    import_comfy()
    with one_thread():
        yield tiny_model()


def _comfy(tiny: Tiny, strategy: Any, sampler: str, sigmas: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
    import comfy.samplers
    from guidekit_comfyui.guider import GuidekitComfyGuider

    sigmas = schedule() if sigmas is None else sigmas
    n = noise()
    guider = GuidekitComfyGuider(tiny.patcher, strategy)
    guider.set_conds(tiny.positive, tiny.negative)
    out = guider.sample(
        n, torch.zeros_like(n), comfy.samplers.sampler_object(sampler), sigmas, disable_pbar=True, seed=0
    )
    return out, guider


def _comfy_cfg(tiny: Tiny, scale: float, sampler: str) -> torch.Tensor:
    import comfy.samplers

    sigmas, n = schedule(), noise()
    guider = comfy.samplers.CFGGuider(tiny.patcher)
    guider.set_conds(tiny.positive, tiny.negative)
    guider.set_cfg(scale)
    return guider.sample(
        n, torch.zeros_like(n), comfy.samplers.sampler_object(sampler), sigmas, disable_pbar=True, seed=0
    )


def _native(
    tiny: Tiny, strategy: gk.GuidanceStrategy, sampler: str, sigmas: torch.Tensor | None = None
) -> tuple[torch.Tensor, Any]:
    """guidekit's own engine and sampler on the same ComfyUI model, as an EDM x0 adapter; ComfyUI's latent scale."""
    model = tiny.patcher.model
    adapter = EDMModel(lambda x, sigma, cond: model.apply_model(x, sigma, c_crossattn=cond), prediction="x0")
    sigmas = (schedule() if sigmas is None else sigmas).double()
    denoiser = gk.guided(adapter, strategy, tiny.cond, tiny.uncond)
    x = SAMPLERS.get(sampler)(denoiser, noise() * sigmas[0].float(), sigmas)
    return model.process_latent_out(x), denoiser


def _registered() -> list[str]:
    return [n for n in STRATEGIES.names() if n not in REASONS]


@pytest.mark.parametrize(("comfy_sampler", "_gk"), SAMPLER_PAIRS)
def test_cfg_equals_comfyui_cfg_guider_exactly(tiny: Tiny, comfy_sampler: str, _gk: str) -> None:
    ours, guider = _comfy(tiny, gk.CFG(3.0), comfy_sampler)
    theirs = _comfy_cfg(tiny, 3.0, comfy_sampler)
    assert torch.equal(ours, theirs), float((ours - theirs).abs().max())
    assert guider.engine.nfe == sum(len(c) for c in guider.backend.calls)


def test_the_plugin_strategy_is_covered() -> None:
    assert "perp-cfg" in _registered()  # the example plugin's entry point, installed by the test command
    assert {"cfg++", "autoguidance"} <= set(NOT_A_GUIDER)


@pytest.mark.parametrize("name", _registered())
def test_every_strategy_equals_the_native_engine(tiny: Tiny, name: str) -> None:
    strategy = example(name)
    for comfy_sampler, gk_sampler in SAMPLER_PAIRS:
        ours, guider = _comfy(tiny, strategy, comfy_sampler)
        native, denoiser = _native(tiny, strategy, gk_sampler)
        scale = float(native.abs().max())
        err = float((ours - native).abs().max()) / scale
        assert err < 2e-5, f"{name} on {comfy_sampler}: relative max error {err:.2e}"
        assert guider.engine.nfe == denoiser.nfe, (name, comfy_sampler)
        assert [r.branches for r in guider.engine.records] == [r.branches for r in denoiser.records]
        assert guider.engine.nfe == sum(len(c) for c in guider.backend.calls)  # rows ComfyUI ran = the plan's


def test_autoguidance_with_a_weak_model_equals_the_native_engine(tiny: Tiny) -> None:
    """The weak branch runs on the second MODEL through the same calc_cond_batch (AutoGuidance, Karras et al.)."""
    import comfy.samplers
    from guidekit_comfyui.guider import GuidekitComfyGuider

    weak = tiny_model(seed=1)
    strategy = gk.AutoGuidance(2.0)
    model, weak_base = tiny.patcher.model, weak.patcher.model
    main = EDMModel(lambda x, sigma, cond: model.apply_model(x, sigma, c_crossattn=cond), prediction="x0")
    weak_adapter = EDMModel(lambda x, sigma, cond: weak_base.apply_model(x, sigma, c_crossattn=cond), prediction="x0")
    for comfy_sampler, gk_sampler in SAMPLER_PAIRS:
        n, sigmas = noise(), schedule()
        guider = GuidekitComfyGuider(tiny.patcher, strategy, weak_model=weak.patcher)
        guider.set_conds(tiny.positive, tiny.negative)
        sampler = comfy.samplers.sampler_object(comfy_sampler)
        ours = guider.sample(n, torch.zeros_like(n), sampler, sigmas, disable_pbar=True)
        denoiser = gk.guided(main, strategy, tiny.cond, tiny.uncond, weak_model=weak_adapter)
        native = model.process_latent_out(SAMPLERS.get(gk_sampler)(denoiser, n * sigmas[0], sigmas.double()))
        assert float((ours - native).abs().max()) / float(native.abs().max()) < 2e-5, comfy_sampler
        assert guider.engine.nfe == denoiser.nfe
        assert {c for c in guider.backend.calls} == {("cond",), ("weak",)}


def test_a_weak_model_the_strategy_never_uses_is_refused(tiny: Tiny) -> None:
    with pytest.raises(ConfigError, match="weak_model: expected None"):
        from guidekit_comfyui.guider import GuidekitComfyGuider

        guider = GuidekitComfyGuider(tiny.patcher, gk.CFG(2.0), weak_model=tiny_model(seed=1).patcher)
        guider.set_conds(tiny.positive, tiny.negative)
        import comfy.samplers

        n = noise()
        guider.sample(n, torch.zeros_like(n), comfy.samplers.sampler_object("euler"), schedule(), disable_pbar=True)


def test_nfe_rows_counted_inside_comfyui_match_the_plan(tiny: Tiny) -> None:
    """Rows through ComfyUI's model function (a unet wrapper counts them): Interval skips the negative branch."""
    rows: list[int] = []

    def count(apply_model: Any, args: dict[str, Any]) -> torch.Tensor:
        rows.append(int(args["input"].shape[0]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched = tiny.patcher.clone()
    patched.set_model_unet_function_wrapper(count)
    strategy = gk.Interval(gk.CFG(3.0), sigma_lo=0.5, sigma_hi=3.0)
    _, guider = _comfy(tiny._replace(patcher=patched), strategy, "heun")
    plan_rows = [len(c) for c in guider.backend.calls]
    assert rows == plan_rows and sum(rows) == guider.engine.nfe
    assert 1 in rows and 2 in rows  # cond alone outside the interval, [cond; uncond] inside
    per_step = [r.nfe for r in guider.engine.records]
    assert per_step[-1] == sum(rows)


def test_heun_commits_the_state_once_per_step(tiny: Tiny) -> None:
    """APG's momentum: the corrector (at the next step's sigma) is substep 1 and does not advance it."""
    strategy = gk.APG(scale=4.0, momentum=-0.5, norm_threshold=5.0)
    ours, guider = _comfy(tiny, strategy, "heun")
    n = len(schedule()) - 1
    expected = [(i, s) for i in range(n) for s in ((0, 1) if i < n - 1 else (0,))]
    assert guider.clock.positions == expected
    native, _ = _native(tiny, strategy, "heun")
    assert float((ours - native).abs().max()) / float(native.abs().max()) < 2e-5


@dataclasses.dataclass(frozen=True, eq=False)
class _Counting(gk.GuidanceStrategy):
    """CFG whose state counts the evaluations it was committed from; logs ``(step, substep, state)``."""

    scale: float = 2.0
    seen: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)

    def combine(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor, ctx: gk.GuidanceContext) -> torch.Tensor:
        return pred_uncond + self.scale * (pred_cond - pred_uncond)

    def init_state(self, like: torch.Tensor) -> int:
        return 0

    def combine_step(
        self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor, ctx: gk.GuidanceContext, state: int
    ) -> tuple[torch.Tensor, int]:
        self.seen.append((ctx.step, ctx.substep, state))
        return self.combine(pred_cond, pred_uncond, ctx), state + 1


def test_state_is_committed_once_per_step_under_heun(tiny: Tiny) -> None:
    """The predictor's state is committed at once (the corrector is handed it) and the corrector's is dropped:
    step i starts from i commits, never from the corrector's extra one (the engine's state rule)."""
    strategy = _Counting()
    _comfy(tiny, strategy, "heun")
    n = len(schedule()) - 1
    expected = [(i, s, i + s) for i in range(n) for s in ((0, 1) if i < n - 1 else (0,))]
    assert strategy.seen == expected
    # sigma alone cannot tell Heun's corrector from the next step: a clock without the table gets it wrong
    from guidekit_comfyui import guider as module

    saved, wrong = module.CORRECTORS.pop("sample_heun"), _Counting()
    try:
        _comfy(tiny, wrong, "heun")
    finally:
        module.CORRECTORS["sample_heun"] = saved
    assert wrong.seen != expected


def test_a_rerun_with_the_same_guider_restarts_the_state(tiny: Tiny) -> None:
    import comfy.samplers

    strategy = gk.APG(scale=4.0, momentum=-0.5, norm_threshold=5.0)
    first, guider = _comfy(tiny, strategy, "euler")
    n = noise()
    again = guider.sample(n, torch.zeros_like(n), comfy.samplers.sampler_object("euler"), schedule(), disable_pbar=True)
    assert torch.equal(first, again)


def test_percent_window_node_guides_the_same_steps_in_float32_and_float64(tiny: Tiny) -> None:
    from guidekit_comfyui.nodes import IntervalPercentNode, strategy_node

    (cfg,) = strategy_node("cfg")().make(scale=3.0)
    (window,) = IntervalPercentNode().make(cfg, 0.25, 0.75)
    sigmas = schedule()
    ours, guider = _comfy(tiny, window, "euler", sigmas)
    assert [r.uncond_used for r in guider.engine.records] == [False, True, True, False]
    expected = gk.Interval.from_fractions(gk.CFG(3.0), 0.25, 0.75, sigmas.double())
    native, _ = _native(tiny, expected, "euler", sigmas)
    assert float((ours - native).abs().max()) / float(native.abs().max()) < 2e-5
    assert window.resolve(sigmas) == window.resolve(sigmas.double())


@pytest.mark.parametrize("name", sorted(NOT_A_GUIDER))
def test_strategies_the_guider_cannot_run_are_refused_by_name(tiny: Tiny, name: str) -> None:
    with pytest.raises(ConfigError, match=NOT_A_GUIDER[name]):
        _comfy(tiny, example(name), "euler")


@dataclasses.dataclass(frozen=True)
class _Blurred(gk.Perturbation):
    kind: ClassVar[str] = "blur"


@dataclasses.dataclass(frozen=True, eq=False)
class _WithPerturbation(gk.GuidanceStrategy):
    """CFG plus a perturbed pass (as PAG/SEG will plan): a branch this guider cannot run."""

    def branches(self, ctx: gk.GuidanceContext, state: Any) -> tuple[gk.Branch, ...]:
        return (gk.COND, gk.UNCOND, gk.Branch("blurred", perturbation=_Blurred()))

    def combine(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor, ctx: gk.GuidanceContext) -> torch.Tensor:
        return pred_cond


def test_an_unsupported_perturbation_is_refused_by_name(tiny: Tiny) -> None:
    with pytest.raises(ConfigError, match=r"Guidekit Guider.*'blurred'.*perturbation 'blur'"):
        _comfy(tiny, _WithPerturbation(), "euler")


def test_the_guider_takes_its_scale_from_the_strategy(tiny: Tiny) -> None:
    from guidekit_comfyui.guider import GuidekitComfyGuider

    with pytest.raises(ConfigError, match="cfg"):
        GuidekitComfyGuider(tiny.patcher, gk.CFG(2.0)).set_cfg(5.0)


def test_the_step_clock_without_a_table_entry_uses_the_schedule() -> None:
    from guidekit_comfyui.guider import StepClock

    sigmas = torch.tensor([4.0, 2.0, 1.0, 0.0])
    clock = StepClock(sigmas, None)
    for sigma, callback in ((4.0, 0), (3.0, None), (2.0, 1), (1.0, 2)):  # 3.0: a mid-step corrector (dpm_2)
        clock.next(sigma)
        if callback is not None:
            clock.on_callback(callback)
    assert clock.positions == [(0, 0), (0, 1), (1, 0), (2, 0)]


def test_records_are_dataclasses_of_the_engine(tiny: Tiny) -> None:
    _, guider = _comfy(tiny, gk.CFG(2.0), "euler")
    assert all(dataclasses.is_dataclass(r) for r in guider.engine.records)
    assert len(guider.engine.records) == len(schedule()) - 1
