"""Adapters both ways between guidekit strategies and ``diffusers.guiders``.

* :class:`GuidekitGuider` puts a guidekit strategy behind the guider interface of diffusers' modular
  pipelines: ``set_state``, ``prepare_inputs``, ``num_conditions``, ``forward`` and ``__call__``. Its
  config holds the strategy's guidekit spec, so ``save_pretrained`` / ``from_pretrained`` round-trip.
* :class:`DiffusersGuidance` wraps a cond/uncond diffusers guider (``ClassifierFreeGuidance``,
  ``AdaptiveProjectedGuidance``, ...) as a guidekit strategy, usable by :func:`guidekit.sample` and
  :func:`~guidekit.integrations.diffusers.generate`.

A guider never sees ``x_t``. :class:`GuidekitGuider` therefore runs a strategy in the space its
predictions are in: it refuses strategies defined in another space (APG works in x0) unless the model
predicts that space. In a full pipeline, use :func:`generate` for those.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput
from torch import Tensor

from ...branch import COND, Branch
from ...config import build, to_spec
from ...context import GuidanceContext, PredictionSpace, StrategySpace
from ...engine import Backend, Engine, Position
from ...engine.perturb import KINDS, applied
from ...errors import ConfigError, GuidekitError
from ...ops.shapes import from_canonical, parse_layout, to_canonical
from ...strategies.base import GuidanceStrategy
from .families import noise_schedule, parse_prediction_type, prediction_space

__all__ = ["DiffusersGuidance", "GuidekitGuider"]

_UNSET: Any = object()
_TUPLE_INDEX = {"cond": 0, "uncond": 1}
"""Where a branch's condition sits in the ``(cond, uncond)`` tuples of a modular pipeline's inputs."""
_PAIR = frozenset({"cond", "uncond"})


def _identifier(branch: Branch) -> str:
    """The name a batch's prediction reaches :meth:`GuidekitGuider.forward` under: ``pred_<branch name>``."""
    return f"pred_{branch.name}"


class GuidekitGuider(BaseGuidance):
    """A guidekit strategy as a diffusers guider (modular pipelines: ``pipe.update_components(guider=...)``).

    Each step the loop calls ``set_state(step, num_inference_steps, timestep)``. The guider turns the
    timestep into EDM sigma with ``scheduler`` and builds the strategy's context. ``num_conditions`` is the
    number of branches this evaluation's plan has, ``cond`` first: 1 outside ``[start, stop)``, where the
    strategy needs no other branch (Interval outside its band, scale 1), or when disabled; 2 with the
    unconditional branch; one more per perturbed branch (PAG, SEG, SLG, STG). A perturbed batch is the
    conditional inputs, run with the perturbation that ``prepare_models`` applies to the denoiser and
    ``cleanup_models`` removes (the diffusers backend's processors and block skips). A repeated step index
    is treated as a corrector evaluation (Heun), so the strategy's state advances once per step. The state
    restarts at step 0.

    Args:
        strategy: a guidekit strategy, or its spec (``{"name": ..., "params": ...}``, as stored in the
            config).
        scheduler: the pipeline's scheduler. It maps timesteps to sigma and gives the default
            ``prediction_type``. It is required before the first step. It is not part of the config:
            after ``from_pretrained``, set ``guider.scheduler``.
        prediction_type: the space of the predictions the guider receives (``"epsilon"``,
            ``"v_prediction"``, ``"flow_prediction"``, ``"sample"``, or the guidekit names). By default
            it is read from the scheduler.
        layout: the layout of those predictions, e.g. ``"b f c h w"`` for CogVideoX.
        start, stop: diffusers' window, as fractions of the step count. Outside it the guider returns
            ``pred_cond``.
        enabled: ``False`` gives ``pred_cond`` at every step.
    """

    _input_predictions: ClassVar[list[str]] = ["pred_cond", "pred_uncond"]

    def __init__(
        self,
        strategy: GuidanceStrategy | dict[str, Any] | None = None,
        scheduler: Any = None,
        prediction_type: str | None = None,
        layout: str = "b c h w",
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ) -> None:
        super().__init__(start, stop, enabled)
        if strategy is None:
            raise ConfigError("strategy: expected a guidekit strategy or its spec, got None")
        self.strategy: GuidanceStrategy = strategy if isinstance(strategy, GuidanceStrategy) else build(strategy)
        parse_layout(layout)
        self.layout = layout
        self.scheduler = scheduler
        self._space = parse_prediction_type(prediction_type) if prediction_type is not None else None
        if self._space is not None:
            _check_space(self.strategy, self._space)
        if self.strategy.sampler_coupled:
            raise ConfigError(
                f"strategy: {type(self.strategy).__name__} re-noises inside the sampler update, which a guider "
                "cannot do; expected a strategy that is not sampler-coupled (use guidekit.sample)"
            )
        spec = to_spec(self.strategy).model_dump(mode="json")
        self.register_to_config(
            strategy=spec, prediction_type=prediction_type, layout=layout, start=start, stop=stop, enabled=enabled
        )
        self._engine: Engine | None = None
        self._last_step: int | None = None
        self._step_sigmas = (0.0, 0.0)
        self._at: tuple[float, float, Tensor] | None = None
        self._schedule: tuple[Tensor, Tensor] | None = None
        self._batches: list[Branch] | None = None
        self._applied = ExitStack()

    # -- the guider protocol ------------------------------------------------------------------------
    def set_state(self, step: int, num_inference_steps: int, timestep: Any) -> None:
        super().set_state(step, num_inference_steps, timestep)
        self._at: tuple[float, float, Tensor] | None = None  # this evaluation's sigmas, read once
        self._batches = None
        self._applied.close()

    def prepare_inputs(self, data: dict[str, Any]) -> list[Any]:
        return [self._prepare_batch(data, _TUPLE_INDEX[b.condition], _identifier(b)) for b in self._plan_batches()]

    def prepare_inputs_from_block_state(self, data: Any, input_fields: dict[str, Any]) -> list[Any]:
        return [
            self._prepare_batch_from_block_state(input_fields, data, _TUPLE_INDEX[b.condition], _identifier(b))
            for b in self._plan_batches()
        ]

    def prepare_models(self, denoiser: Any) -> None:
        """Count the batch, and apply its perturbation to ``denoiser`` (until :meth:`cleanup_models`)."""
        super().prepare_models(denoiser)
        self._applied.close()
        batch = self._current_batch()
        if batch is not None and batch.perturbation is not None:
            self._applied.enter_context(applied(denoiser, batch.perturbation))

    def cleanup_models(self, denoiser: Any) -> None:
        """Remove what :meth:`prepare_models` applied (processors and block forwards restored)."""
        self._applied.close()

    @property
    def num_conditions(self) -> int:
        """The number of batches this evaluation's plan runs: ``cond`` always (on an empty plan, CFG-Zero*'s
        zero-init steps, its prediction goes unused), ``uncond`` when planned, one per perturbed branch."""
        return len(self._plan_batches())

    @property
    def is_conditional(self) -> bool:
        batch = self._current_batch()
        return batch is None or batch.condition == "cond"

    def forward(self, pred_cond: Tensor, pred_uncond: Tensor | None = None, **others: Tensor) -> GuiderOutput:
        """The guided prediction. ``pred_uncond`` is ``None`` when the plan has no unconditional branch;
        perturbed branches arrive as ``pred_<branch name>`` (``pred_perturbed``)."""
        if not self._in_window():
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
        engine = self._engine_for()
        cond = to_canonical(pred_cond, self.layout)
        preds = {"cond": cond}
        if pred_uncond is not None:
            preds["uncond"] = to_canonical(pred_uncond, self.layout)
        for key, pred in others.items():
            preds[key.removeprefix("pred_")] = to_canonical(pred, self.layout)
        sigma = torch.full((cond.shape[0],), self._sigma_at()[0], dtype=torch.float64)
        pending = engine.plan(None, sigma, self._position(), like=cond)
        given = {name: preds[name] for name in (b.name for b in pending.plan) if name in preds}
        out = engine.complete(pending, given)
        self._last_step = self._step
        return GuiderOutput(pred=from_canonical(out.guided, self.layout), pred_cond=pred_cond, pred_uncond=pred_uncond)

    # -- helpers ------------------------------------------------------------------------------------
    def _plan_batches(self) -> list[Branch]:
        """This evaluation's branches in the order the pipeline runs them: ``cond``, ``uncond``, the rest."""
        if self._batches is None:
            batches = [COND]
            if self._in_window():
                engine = self._engine_for()
                plan = engine.preview(torch.ones(1), self._position())
                batches = [next((b for b in plan if b.name == "cond"), COND)]  # NAG perturbs the cond branch itself
                batches += [b for b in plan if b.name == "uncond"] + [b for b in plan if b.name not in _PAIR]
                for branch in batches:
                    engine.backend.check_branch(branch)
            self._batches = batches
        return self._batches

    def _current_batch(self) -> Branch | None:
        """The branch of the batch being prepared (``None`` before the first ``prepare_models``)."""
        batches, k = self._plan_batches(), self._count_prepared - 1
        return batches[k] if 0 <= k < len(batches) else None

    def _engine_for(self) -> Engine:
        if self._engine is None:
            backend = GuiderBackend(self._prediction_space())
            self._engine = Engine(self.strategy, backend, {}, output="native")
        return self._engine

    def _position(self) -> Position:
        """Where this evaluation sits: a repeated step index is a corrector evaluation (Heun)."""
        sigma, sigma_next, sigmas = self._sigma_at()
        step = int(self._step)
        substep = 1 if step == self._last_step else 0
        if substep == 0:
            self._step_sigmas = (sigma, sigma_next)
        step_sigma, step_next = self._step_sigmas  # a corrector keeps its step's levels (one decision per step)
        return Position(
            step=step,
            num_steps=self._num_inference_steps or (len(sigmas) - 1),
            substep=substep,
            sigmas=sigmas,
            step_sigma=step_sigma,
            sigma_next=step_next,
        )

    def _in_window(self) -> bool:
        if not self._enabled:
            return False
        if self._num_inference_steps is None:
            return True
        n = self._num_inference_steps
        return int(self._start * n) <= self._step < int(self._stop * n)

    def _prediction_space(self) -> PredictionSpace:
        if self._space is None:
            space = prediction_space(self.scheduler)
            if space is None:
                raise ConfigError(
                    f"prediction_type: expected it set, or a scheduler with prediction_type in its config, got "
                    f"{type(self.scheduler).__name__} without one"
                )
            _check_space(self.strategy, space)
            self._space = space
        return self._space

    def _sigma_at(self) -> tuple[float, float, Tensor]:
        """This evaluation's EDM sigma, the next one, and the schedule (float64), from the timestep: read once
        per ``set_state`` (num_conditions, the plan and the combine all ask), the schedule once per
        ``set_timesteps``."""
        if self._at is not None:
            return self._at
        if self.scheduler is None:
            raise ConfigError(
                "scheduler: expected the pipeline's scheduler (GuidekitGuider(strategy, scheduler=pipe.scheduler), "
                "or guider.scheduler = ... after from_pretrained) to turn timesteps into sigma, got None"
            )
        if self._timestep is None or self._step is None:
            raise GuidekitError(
                "guider: expected set_state(step, num_inference_steps, timestep) before use, got no timestep"
            )
        timesteps = self.scheduler.timesteps
        t = float(torch.as_tensor(self._timestep).flatten()[0])
        hits = torch.nonzero(timesteps.double().cpu() == t)
        if len(hits) == 0:
            raise ConfigError(f"timestep: expected one of the scheduler's timesteps {timesteps.tolist()}, got {t}")
        cached = self._schedule
        if cached is None or cached[0] is not timesteps:
            cached = self._schedule = (timesteps, noise_schedule(self.scheduler))
        sigmas = cached[1]
        i = int(hits[0])
        self._at = (float(sigmas[i]), float(sigmas[i + 1]), sigmas)
        return self._at

    def __repr__(self) -> str:
        return f"GuidekitGuider(strategy={self.strategy!r}, layout={self.layout!r})"


class GuiderBackend(Backend):
    """The predictions a modular pipeline hands its guider: ``cond`` and ``uncond``, computed by the
    pipeline (the engine's :meth:`~guidekit.engine.Engine.plan` / :meth:`~guidekit.engine.Engine.complete`
    wrap them; nothing is run here)."""

    def __init__(self, space: PredictionSpace) -> None:
        self._space = space

    def models(self) -> frozenset[str]:
        return frozenset({"main"})

    def prediction(self, model: str) -> PredictionSpace:
        return self._space

    def check_branch(self, branch: Branch) -> None:
        perturbation = branch.perturbation
        if (
            branch.model != "main"
            or branch.condition not in _TUPLE_INDEX
            or (perturbation is not None and (perturbation.kind not in KINDS or perturbation.conditions()))
            or branch.observe is not None  # the pipeline's forwards record no attention maps (S-CFG, SAG)
        ):
            raise ConfigError(
                "strategy: a modular guider runs batches of the pipeline's cond and uncond inputs, each on its own, "
                f"perturbed with {sorted(k for k in KINDS if k != 'normalized-attention')} or not; got branch "
                f"{branch!r}, without attention maps (use guidekit.sample or guidekit.integrations.diffusers.generate)"
            )

    def forward(
        self, x: Tensor, sigma: Tensor, branches: Sequence[Branch], conditions: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        raise GuidekitError("forward: a modular guider's predictions come from the pipeline, not from its backend")


def _check_space(strategy: GuidanceStrategy, space: PredictionSpace) -> None:
    if strategy.space not in ("any", "native", space):
        raise ConfigError(
            f"strategy: expected a strategy that works on {space!r} predictions (space 'any', 'native' or "
            f"{space!r}), since a guider never sees x_t to convert them; got {type(strategy).__name__} in "
            f"{strategy.space!r} space (use guidekit.integrations.diffusers.generate, which converts)"
        )


@dataclass(frozen=True, eq=False)
class DiffusersGuidance(GuidanceStrategy):
    """A cond/uncond diffusers guider as a guidekit strategy, on the model's raw predictions.

    The wrapped guider is never mutated. Each run works on a copy, which is the strategy's explicit
    state. Step ``i`` sets the copy's step and applies it; a corrector evaluation (``ctx.substep > 0``)
    works on a throwaway copy, so the guider's own state (APG's momentum) advances once per step.
    ``start``/``stop`` windows keep the guider's meaning (fractions of ``ctx.num_steps``).

    Not registered: a guider is a mutable diffusers object with its own config format
    (``guider_config.json``). Wrap it in code, ``DiffusersGuidance(ClassifierFreeGuidance(5.0))``.

    Args:
        guider: a ``diffusers.guiders`` guider whose predictions are ``pred_cond`` and ``pred_uncond``.
            Layer-skipping guiders (PAG, SLG, SEG) need passes that guidekit does not run, and are refused.
    """

    space: ClassVar[StrategySpace] = "native"
    contract_exempt: ClassVar[dict[str, str]] = {
        "spec_round_trip": "wraps a diffusers guider object, which has its own config format; not registered"
    }

    guider: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.guider, BaseGuidance):
            raise ConfigError(f"guider: expected a diffusers.guiders guider, got {type(self.guider).__name__}")
        predictions = list(self.guider._input_predictions or [])
        if predictions != ["pred_cond", "pred_uncond"]:
            raise ConfigError(
                f"guider: expected a guider of pred_cond and pred_uncond, got {type(self.guider).__name__} with "
                f"{predictions} (its extra passes need model hooks that guidekit does not run)"
            )

    def needs_uncond(self, ctx: GuidanceContext) -> bool:
        return self.needs_uncond_state(ctx, None)

    def needs_uncond_state(self, ctx: GuidanceContext, state: _GuiderState | None) -> bool:
        probe = copy.copy(self.guider if state is None else state.guider)  # set_state only rebinds attributes
        probe.set_state(step=ctx.step, num_inference_steps=ctx.num_steps, timestep=None)
        return probe.num_conditions >= 2

    def init_state(self, like: Tensor) -> _GuiderState:
        return _GuiderState(copy.deepcopy(self.guider))

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        return self.combine_step(pred_cond, pred_uncond, ctx, self.init_state(pred_cond))[0]

    def combine_step(
        self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext, state: _GuiderState
    ) -> tuple[Tensor, _GuiderState]:
        # a corrector combines with the guider its step started from, whichever state it is handed
        start = state.before if ctx.substep > 0 and state.step == ctx.step and state.before is not None else state
        guider = copy.deepcopy(start.guider)
        guider.set_state(step=ctx.step, num_inference_steps=ctx.num_steps, timestep=None)
        guider.prepare_inputs({})  # step 0 resets per-run state (APG's momentum buffer)
        out = guider.forward(pred_cond=pred_cond, pred_uncond=pred_uncond).pred
        return out, (_GuiderState(guider, _GuiderState(state.guider), ctx.step) if ctx.substep == 0 else state)


class _GuiderState:
    """A per-run copy of a guider: :class:`DiffusersGuidance`'s explicit state.

    ``before`` is the state step ``step`` started from: a corrector evaluation of that step, handed this
    state by the engine, combines with ``before``'s guider, so the guider's own state (APG's momentum)
    advances once per step. Two states are equal when their guiders' attributes are (tensors by value).
    """

    __slots__ = ("before", "guider", "step")

    def __init__(self, guider: Any, before: _GuiderState | None = None, step: int = -1) -> None:
        self.guider, self.before, self.step = guider, before, step

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _GuiderState) and _same(vars(self.guider), vars(other.guider))

    __hash__ = None  # type: ignore[assignment]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if hasattr(a, "__dict__") and not isinstance(a, type):
        return type(a) is type(b) and _same(vars(a), vars(b))
    return bool(a == b)
