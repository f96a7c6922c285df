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
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput
from torch import Tensor

from ...config import build, to_spec
from ...context import GuidanceContext, PredictionSpace, StrategySpace
from ...errors import ConfigError, GuidekitError
from ...ops.shapes import from_canonical, parse_layout, to_canonical
from ...strategies.base import GuidanceStrategy
from .families import noise_schedule, parse_prediction_type, prediction_space

__all__ = ["DiffusersGuidance", "GuidekitGuider"]

_UNSET: Any = object()


class GuidekitGuider(BaseGuidance):
    """A guidekit strategy as a diffusers guider (modular pipelines: ``pipe.update_components(guider=...)``).

    Each step the loop calls ``set_state(step, num_inference_steps, timestep)``. The guider turns the
    timestep into EDM sigma with ``scheduler`` and builds the strategy's context. ``num_conditions`` is 2
    when the strategy needs the unconditional branch, and 1 otherwise: outside ``[start, stop)``, where
    the strategy does not need it (Interval outside its band, scale 1), or when disabled. A repeated
    step index is treated as a corrector evaluation (Heun), so the strategy's state advances once per
    step. The state restarts at step 0.

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
        spec = to_spec(self.strategy).model_dump(mode="json")
        self.register_to_config(
            strategy=spec, prediction_type=prediction_type, layout=layout, start=start, stop=stop, enabled=enabled
        )
        self._state: Any = _UNSET
        self._step_state: Any = _UNSET
        self._last_step: int | None = None

    # -- the guider protocol ------------------------------------------------------------------------
    def prepare_inputs(self, data: dict[str, Any]) -> list[Any]:
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [self._prepare_batch(data, i, name) for i, name in zip(indices, self._input_predictions, strict=False)]

    def prepare_inputs_from_block_state(self, data: Any, input_fields: dict[str, Any]) -> list[Any]:
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [
            self._prepare_batch_from_block_state(input_fields, data, i, name)
            for i, name in zip(indices, self._input_predictions, strict=False)
        ]

    @property
    def num_conditions(self) -> int:
        if not self._in_window():
            return 1
        ctx = self._context(1)
        if self._new_run():  # no state yet for this run: ask the stateless question
            return 2 if self.strategy.needs_uncond(ctx) else 1
        state = self._step_state if self._step == self._last_step else self._state
        return 2 if self.strategy.needs_uncond_state(ctx, state) else 1

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    def forward(self, pred_cond: Tensor, pred_uncond: Tensor | None = None) -> GuiderOutput:
        """The guided prediction. ``pred_uncond`` is ``None`` when ``num_conditions`` was 1."""
        if not self._in_window():
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
        cond = to_canonical(pred_cond, self.layout)
        uncond = cond if pred_uncond is None else to_canonical(pred_uncond, self.layout)
        if self._new_run():
            self._state, self._last_step = self.strategy.init_state(cond), None
        substep = 1 if self._step == self._last_step else 0
        if substep == 0:
            self._step_state = self._state
        ctx = self._context(pred_cond.shape[0]).replace(substep=substep)
        renoise = getattr(self.strategy, "renoise_prediction", None)
        if renoise is not None and renoise(cond, uncond, ctx) is not None:
            raise ConfigError(
                f"strategy: {type(self.strategy).__name__} re-noises inside the sampler update, which a guider "
                "cannot do; expected a strategy without renoise_prediction (use guidekit.sample)"
            )
        out, state = self.strategy.step(cond, uncond, ctx, self._step_state)
        if substep == 0:
            self._state = state
        self._last_step = self._step
        return GuiderOutput(pred=from_canonical(out, self.layout), pred_cond=pred_cond, pred_uncond=pred_uncond)

    # -- helpers ------------------------------------------------------------------------------------
    def _in_window(self) -> bool:
        if not self._enabled:
            return False
        if self._num_inference_steps is None:
            return True
        n = self._num_inference_steps
        return int(self._start * n) <= self._step < int(self._stop * n)

    def _new_run(self) -> bool:
        """No state yet, or step 0 again after a later step (a repeated step is a corrector evaluation)."""
        return self._state is _UNSET or (self._step == 0 and self._last_step not in (None, 0))

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

    def _context(self, batch: int) -> GuidanceContext:
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
        sigmas = noise_schedule(self.scheduler)
        i = int(hits[0])
        sigma = torch.full((batch,), float(sigmas[i]), dtype=torch.float32)
        return GuidanceContext(
            sigma=sigma,
            step=self._step,
            num_steps=self._num_inference_steps or len(timesteps),
            sigmas=sigmas.float(),
            sigma_next=torch.full_like(sigma, float(sigmas[i + 1])),
            space=self._prediction_space(),
        )


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
        guider = copy.deepcopy(state.guider)
        guider.set_state(step=ctx.step, num_inference_steps=ctx.num_steps, timestep=None)
        guider.prepare_inputs({})  # step 0 resets per-run state (APG's momentum buffer)
        out = guider.forward(pred_cond=pred_cond, pred_uncond=pred_uncond).pred
        return out, (_GuiderState(guider) if ctx.substep == 0 else state)


class _GuiderState:
    """A per-run copy of a guider: :class:`DiffusersGuidance`'s explicit state.

    Two states are equal when their attributes are (tensors by value), so a replayed run can be checked.
    """

    __slots__ = ("guider",)

    def __init__(self, guider: Any) -> None:
        self.guider = guider

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
