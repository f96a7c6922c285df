"""The ComfyUI edge of guidekit's engine: a ``CFGGuider`` subclass and the backend that runs ComfyUI's model.

Per model evaluation (``predict_noise``) the guider asks the engine for the plan, runs ComfyUI's
``calc_cond_batch`` for exactly the branches in it (``[positive, negative]`` in one batch, or ``[positive]``
alone) and lets the engine combine, convert and keep the state. Nothing of the rules lives here.

**Where an evaluation sits.** ComfyUI's samplers hand the guider ``(x, sigma)`` only. The guider wraps the
sampler's callback, which k-diffusion samplers call right after a step's first evaluation with the step
index; together with the schedule (the sigmas the guider's ``inner_sample`` receives, ComfyUI's
``sample_sigmas``) and how many corrector evaluations the sampler makes per step (:data:`CORRECTORS`),
each evaluation gets its step and substep. Heun's corrector runs at the next step's sigma, so the sigma
alone cannot tell it from the next step: the table can. Samplers not in the table: an evaluation after
the step's callback at the next schedule value starts the next step, any other is a corrector.

**Coordinates.** ComfyUI's ``x`` for eps and v models is k-diffusion's EDM ``x`` and its ``sigma`` the EDM
sigma; its output (``denoised``) is x0. Flow models (``CONST`` model sampling) are converted:
``x_edm = x / (1 - t)``, ``sigma = t / (1 - t)``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import torch
from torch import Tensor

from guidekit.branch import Branch, NoPerturbation
from guidekit.engine import Backend, Engine, Position
from guidekit.errors import ConfigError, GuidekitError
from guidekit.ops.spaces import PredictionSpace
from guidekit.strategies.base import GuidanceStrategy

from .perturb import KINDS, with_perturbation
from .strategy import StrategyRef, as_ref

__all__ = [
    "CORRECTORS",
    "ComfyBackend",
    "ComfyBranches",
    "GuidekitComfyGuider",
    "StepClock",
    "edm_sigmas",
    "start_run",
    "to_edm",
]

log = logging.getLogger("guidekit_comfyui")

CORRECTORS: dict[str, int] = {
    "sample_euler": 0,
    "sample_euler_ancestral": 0,
    "sample_dpmpp_2m": 0,
    "sample_dpmpp_2m_sde": 0,
    "sample_dpmpp_3m_sde": 0,
    "sample_lms": 0,
    "sample_ddpm": 0,
    "sample_lcm": 0,
    "sample_ipndm": 0,
    "sample_ipndm_v": 0,
    "sample_deis": 0,
    "sample_heun": 1,
    "sample_heunpp2": 2,
    "sample_dpm_2": 1,
    "sample_dpm_2_ancestral": 1,
    "sample_dpmpp_2s_ancestral": 1,
    "sample_dpmpp_sde": 1,
}
"""k-diffusion sampler function -> corrector evaluations per step (none on a step that ends at sigma 0)."""

_COMFY_CONDS = {"cond": "positive", "uncond": "negative"}


def sampler_name(sampler: Any) -> str | None:
    """The k-diffusion function name behind a ComfyUI sampler object (``"sample_heun"``), if any."""
    fn = getattr(sampler, "sampler_function", None)
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", None)


class StepClock:
    """Step and substep of each evaluation of one ComfyUI sampler run (see the module docstring).

    Args:
        sigmas: the run's schedule (``N + 1`` values).
        correctors: corrector evaluations per step, ``None`` when the sampler is not in :data:`CORRECTORS`.
    """

    def __init__(self, sigmas: Tensor, correctors: int | None) -> None:
        self.sigmas = sigmas.detach().to(device="cpu", dtype=torch.float64)
        self.values: list[float] = self.sigmas.tolist()
        self.num_steps = len(self.values) - 1
        self.correctors = correctors
        self.step, self.substep = -1, 0
        self.called_back = False
        self.positions: list[tuple[int, int]] = []
        """``(step, substep)`` of every evaluation so far (tests read it)."""

    def on_callback(self, step: int) -> None:
        """The sampler's callback for ``step`` (called after the step's first evaluation)."""
        if step == self.step:
            self.called_back = True

    def next(self, sigma: float) -> Position:
        """The position of the evaluation at ``sigma`` that comes now."""
        if self.step < 0:
            self._start(0)
        elif not self.called_back or self._corrector(sigma):
            self.substep += 1
        else:
            self._start(self.step + 1)
        self.positions.append((self.step, self.substep))
        i = self.step
        return Position(i, self.num_steps, self.substep, self.sigmas, self.values[i], self.values[i + 1])

    def _start(self, step: int) -> None:
        if step >= self.num_steps:
            raise GuidekitError(
                f"sampler: expected at most {self.num_steps} steps over the schedule, got an evaluation for step "
                f"{step} (a sampler with more corrector evaluations than guidekit_comfyui.guider.CORRECTORS says?)"
            )
        self.step, self.substep, self.called_back = step, 0, False

    def _corrector(self, sigma: float) -> bool:
        nxt = self.values[self.step + 1]
        if self.correctors is not None:
            return nxt != 0.0 and self.substep < self.correctors
        return not math.isclose(sigma, nxt, rel_tol=1e-6)


class ComfyBranches(Backend):
    """What ComfyUI can evaluate for guidekit: the positive and negative conditionings of one model, as x0.

    The base of both edges: :class:`ComfyBackend` runs them itself; the model patch
    (:mod:`guidekit_comfyui.patch`) gets them from ComfyUI's own ``sampling_function``.
    """

    who: str = "the Guidekit nodes"

    def models(self) -> frozenset[str]:
        return frozenset({"main"})

    def prediction(self, model: str) -> PredictionSpace:
        return "x0"

    def check_branch(self, branch: Branch) -> None:
        if branch.model not in self.models():
            hint = " (connect the weak_model input of the Guidekit Guider)" if branch.model == "weak" else ""
            raise ConfigError(
                f"{branch.model}_model: expected a model for branch {branch.name!r}, since the strategy evaluates "
                f"it; {self.who} got {sorted(self.models())}{hint}"
            )
        if branch.observe is not None:  # ComfyUI's forwards record no attention maps (SAG, S-CFG)
            raise ConfigError(
                f"strategy: {self.who} record no attention maps, got branch {branch.name!r} observing "
                f"{list(branch.observe.layers)} (SAG, S-CFG: use guidekit.sample or generate)"
            )
        if branch.condition not in _COMFY_CONDS or not self.supports(branch.perturbation):
            kind = "none" if branch.perturbation is None else branch.perturbation.kind
            applies = sorted(self.perturbations - {NoPerturbation.kind}) or "no perturbations"
            raise ConfigError(
                f"strategy: {self.who} run the positive and negative conditionings with {applies}, got branch "
                f"{branch.name!r} (condition {branch.condition!r}, perturbation {kind!r})"
            )

    def forward(
        self, x: Tensor, sigma: Tensor, branches: Sequence[Branch], conditions: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        raise GuidekitError(f"forward: {self.who} get the predictions from ComfyUI's sampling_function")


def start_run(
    ref: StrategyRef, backend: Backend, sampler: Any, sigmas: Tensor, model_sampling: Any
) -> tuple[Engine, StepClock]:
    """The engine and step clock of one ComfyUI sampler run over ``sigmas`` (a fresh state per run).

    The schedule is converted to EDM sigma first (:func:`edm_sigmas`): percent windows resolve on it and the
    engine's one-decision-per-step value is an EDM sigma, whatever the model's coordinates.
    """
    sigmas = edm_sigmas(model_sampling, sigmas)
    strategy = ref.resolve(sigmas)
    if strategy.sampler_coupled:
        raise ConfigError(
            f"strategy: {type(strategy).__name__} re-noises inside the sampler update, which a ComfyUI guider or "
            "model patch cannot do; expected a strategy that is not sampler-coupled (use ComfyUI's *_cfg_pp samplers)"
        )
    engine = Engine(strategy, backend, {}, output="x0")
    name = sampler_name(sampler)
    return engine, StepClock(sigmas, CORRECTORS.get(name) if name is not None else None)


def edm_sigmas(model_sampling: Any, sigmas: Tensor) -> Tensor:
    """A ComfyUI schedule as EDM sigmas in float64: as is for eps/v models, ``t / (1 - t)`` for flow (t = 1: inf)."""
    sigmas = sigmas.detach().to(device="cpu", dtype=torch.float64)
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return torch.where(sigmas >= 1, torch.full_like(sigmas, math.inf), sigmas / (1 - sigmas))
    return sigmas


def to_edm(model_sampling: Any, x: Tensor, timestep: Tensor) -> tuple[Tensor, Tensor]:
    """ComfyUI's ``(x, sigma)`` -> EDM: the same for eps/v models, ``x / (1 - t)``, ``t / (1 - t)`` for flow."""
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        t = timestep.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return x / (1 - t), timestep / (1 - timestep)
    return x, timestep


class ComfyBackend(ComfyBranches):
    """Runs ComfyUI's model through ``comfy.samplers.calc_cond_batch`` for the guider's current evaluation;
    a perturbed group runs with the perturbation as model patches (:mod:`guidekit_comfyui.perturb`)."""

    who = "the Guidekit Guider"
    perturbations: ClassVar[frozenset[str]] = frozenset({NoPerturbation.kind}) | KINDS

    def __init__(self, guider: GuidekitComfyGuider) -> None:
        self.guider = guider
        self.calls: list[tuple[str, ...]] = []
        """The branch names of every ``calc_cond_batch`` call (tests count rows with it)."""

    def models(self) -> frozenset[str]:
        return frozenset({"main", "weak"} if self.guider.weak_model is not None else {"main"})

    def forward(
        self, x: Tensor, sigma: Tensor, branches: Sequence[Branch], conditions: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        g = self.guider
        x_comfy, timestep, model_options = g.current(x)
        model = g.inner_model if branches[0].model == "main" else g.weak_model.model
        conds = []
        for b in branches:
            cond = g.conds.get(_COMFY_CONDS[b.condition])
            if cond is None:
                raise ConfigError(
                    f"{_COMFY_CONDS[b.condition]}: expected a conditioning, since the strategy evaluates branch "
                    f"{b.name!r} at this step; got None"
                )
            conds.append(cond)
        self.calls.append(tuple(b.name for b in branches))
        model_options = with_perturbation(model_options, branches[0].perturbation, model.diffusion_model)
        out = comfy.samplers.calc_cond_batch(model, conds, x_comfy, timestep, model_options)
        return {b.name: o for b, o in zip(branches, out, strict=True)}


class GuidekitComfyGuider(comfy.samplers.CFGGuider):
    """A ComfyUI GUIDER (for ``SamplerCustomAdvanced``) that guides with a guidekit strategy.

    Args:
        model_patcher: ComfyUI's ``MODEL``.
        strategy: a :class:`StrategyRef` (a strategy node's output), a guidekit strategy or its spec.
        weak_model: AutoGuidance's weak ``MODEL`` (same family as ``model``: the conditionings are prepared for
            ``model``); refused for a strategy that never evaluates it.
    """

    def __init__(
        self,
        model_patcher: Any,
        strategy: StrategyRef | GuidanceStrategy | dict[str, Any],
        weak_model: Any = None,
    ) -> None:
        super().__init__(model_patcher)
        self.strategy_ref = as_ref(strategy, "Guidekit Guider", "strategy")
        self.weak_model = weak_model
        self.engine: Engine | None = None
        self.backend = ComfyBackend(self)
        self.clock: StepClock | None = None
        self._current: tuple[Tensor, Tensor, Tensor, dict[str, Any]] | None = None

    def set_cfg(self, cfg: float) -> None:
        raise ConfigError("cfg: the Guidekit Guider takes its scale from the strategy, got a cfg to set")

    # -- the run ---------------------------------------------------------------------------------------
    def inner_sample(
        self,
        noise: Tensor,
        latent_image: Tensor,
        device: Any,
        sampler: Any,
        sigmas: Tensor,
        denoise_mask: Any,
        callback: Callable[..., Any] | None,
        disable_pbar: bool,
        seed: int | None,
    ) -> Tensor:
        weak = self.weak_model
        if weak is not None:
            comfy.model_management.load_models_gpu([weak])
        model_sampling = self.inner_model.model_sampling
        self.engine, self.clock = start_run(self.strategy_ref, self.backend, sampler, sigmas, model_sampling)
        clock = self.clock
        self.backend.calls.clear()
        self._warn_hooks()

        def on_step(step: int, x0: Tensor, x: Tensor, total: int) -> None:
            clock.on_callback(step)
            if callback is not None:
                callback(step, x0, x, total)

        if weak is None:
            return super().inner_sample(
                noise, latent_image, device, sampler, sigmas, denoise_mask, on_step, disable_pbar, seed
            )
        weak.pre_run()  # as outer_sample does for the main model
        try:
            return super().inner_sample(
                noise, latent_image, device, sampler, sigmas, denoise_mask, on_step, disable_pbar, seed
            )
        finally:
            weak.cleanup()

    def predict_noise(
        self, x: Tensor, timestep: Tensor, model_options: dict[str, Any] | None = None, seed: Any = None
    ) -> Tensor:
        if self.engine is None or self.clock is None:
            raise GuidekitError("guider: expected sample() to start a run before a model evaluation, got none")
        model_options = {} if model_options is None else model_options
        x_edm, sigma = to_edm(self.inner_model.model_sampling, x, timestep)
        position = self.clock.next(float(sigma.reshape(-1)[0]))
        self._current = (x_edm, x, timestep, model_options)
        try:
            return self.engine.evaluate(x_edm, sigma, position).guided
        finally:
            self._current = None

    def current(self, x_edm: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """ComfyUI's ``(x, timestep, model_options)`` of the evaluation the engine is running."""
        if self._current is None or self._current[0] is not x_edm:
            raise GuidekitError("backend: expected the sample of the current evaluation, got another tensor")
        return self._current[1], self._current[2], self._current[3]

    def _warn_hooks(self) -> None:
        hooks = [
            k
            for k in ("sampler_cfg_function", "sampler_pre_cfg_function", "sampler_post_cfg_function")
            if self.model_options.get(k)
        ]
        if hooks:
            log.warning(
                "Guidekit Guider: the model carries %s from other nodes; the guidekit strategy replaces ComfyUI's "
                "cfg stage, so they are not applied",
                ", ".join(hooks),
            )
