"""The per-call state of ``generate``: the intercepted denoiser, the strategy's state and the NFE count."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ...context import GuidanceContext, PredictionSpace
from ...errors import ConfigError, GuidekitError, ShapeError
from ...guided import guided
from ...ops.shapes import canonical_layout, check_layout, from_canonical, parse_layout, to_canonical
from ...ops.spaces import convert, edm_x_from, x_for_space
from ...strategies.base import GuidanceStrategy
from .calls import Call, pack, zip_cat
from .families import Coords, Family, is_flow, noise_schedule

if TYPE_CHECKING:
    from .stand_in import SamplerScheduler

__all__ = ["GenerationInfo", "GuidedRun"]

# -- what generate() reports -------------------------------------------------------------------------------


@dataclass
class GenerationInfo:
    """What a :func:`generate` call did.

    ``nfe`` counts network evaluations per sample. A batched ``[uncond; cond]`` forward counts 2, a
    conditional-only forward 1, and a skipped network 0. ``forwards`` counts denoiser calls. ``steps``
    holds one ``(step, sigma, uncond_used)`` per sampler step: the EDM sigma of the step's first
    evaluation, and whether any evaluation of the step ran the unconditional branch.
    """

    family: str
    prediction_type: PredictionSpace | None
    sampler: str
    nfe: int = 0
    forwards: int = 0
    steps: list[tuple[int, float, bool]] = field(default_factory=list)

    def _log(self, step: int, sigma: float, uncond_used: bool) -> None:
        if self.steps and self.steps[-1][0] == step:
            last = self.steps[-1]
            self.steps[-1] = (step, last[1], last[2] or uncond_used)
        else:
            self.steps.append((step, sigma, uncond_used))


# -- the guided run --------------------------------------------------------------------------------------

_UNSET: Any = object()


class GuidedRun:
    """The per-call state of :func:`generate`: strategy state, step position, NFE, the Wan half-call."""

    def __init__(
        self,
        family_name: str,
        family: Family,
        strategy: GuidanceStrategy,
        space: PredictionSpace | None,
        scheduler: Any,
        sampler_name: str,
        allow_nonfinite: bool,
    ) -> None:
        self.family, self.strategy, self.space = family, strategy, space
        self.scheduler = scheduler
        self.allow_nonfinite = allow_nonfinite
        self.info = GenerationInfo(family_name, space, sampler_name)
        self.handle: Callable[[Call], Tensor] = self._scheduler_step
        self._pending: tuple[tuple[Any, ...], dict[str, Any], Tensor] | None = None
        self._space = _strategy_space(strategy, space, scheduler)
        self._skips = getattr(strategy, "skips_model", None)
        self._renoise = getattr(strategy, "renoise_prediction", None)
        self._schedule: _Schedule | None = None
        self._is_canonical = canonical_layout(family.layout) == " ".join(parse_layout(family.layout))
        self._cursor = 0
        self._step = -1
        self._state: Any = _UNSET
        self._step_state: Any = _UNSET

    # -- interception ---------------------------------------------------------------------------------
    def intercept(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        """The function installed as ``denoiser.forward`` for the duration of the pipeline call."""
        latent_arg = self.family.latent_arg

        def guided_forward(*args: Any, **kwargs: Any) -> Any:
            latent = kwargs[latent_arg] if latent_arg in kwargs else args[0]
            return_dict = kwargs.get("return_dict", True)
            if self.family.cfg_call == "batched":
                if latent.shape[0] % 2:
                    raise ShapeError(
                        f"denoiser input: expected the pipeline's [uncond; cond] batch (even size), got batch "
                        f"{latent.shape[0]}"
                    )
                b = latent.shape[0] // 2
                g = self.handle(Call(forward, args, kwargs, latent_arg, cond=slice(b, 2 * b), uncond=slice(0, b)))
                return pack(torch.cat([g, g]), return_dict)
            # sequential (Wan): a cond call, then an uncond call; both are answered with g
            if self._pending is None:
                placeholder = torch.empty_like(latent)
                self._pending = (args, kwargs, placeholder)
                return pack(placeholder, return_dict)
            cond_args, cond_kwargs, placeholder = self._pending
            self._pending = None
            b = latent.shape[0]
            merged_args = tuple(zip_cat(a, u, b) for a, u in zip(cond_args, args, strict=True))
            merged_kwargs = {k: zip_cat(v, kwargs.get(k), b) for k, v in cond_kwargs.items()}
            g = self.handle(Call(forward, merged_args, merged_kwargs, latent_arg, slice(0, b), slice(b, 2 * b)))
            placeholder.copy_(g)
            return pack(g, return_dict)

        return guided_forward

    # -- the pipeline's scheduler drives ----------------------------------------------------------------
    def _scheduler_step(self, call: Call) -> Tensor:
        """One evaluation inside the pipeline's own loop: locate it in the schedule, guide, return ``g``."""
        if self._schedule is None:
            self._schedule = _Schedule.read(self.scheduler, self.space)
            check_layout(call.latent(), self.family.layout, "denoiser latent")
        i = self._locate(float(call.timestep().flatten()[0]))
        substep = 0 if not self._schedule.two_stage or self.scheduler.state_in_first_order else 1
        self._step += substep == 0
        layout, latent = self.family.layout, call.latent()[call.cond]
        x = self._canonical(latent)
        ctx = self._context(x, i, substep)
        state = self._state_for(substep, x)
        if self._skips is not None and self._skips(ctx):
            cond = uncond = torch.zeros_like(latent)  # CFG-Zero*'s zero-init: the strategy does not read them
            used_uncond, nfe = False, 0
        else:
            used_uncond = bool(self.strategy.needs_uncond_state(ctx, state))
            pred = call.run(cond_only=not used_uncond)
            cond, uncond = (pred[call.cond], pred[call.uncond]) if used_uncond else (pred, pred)
            nfe = 2 if used_uncond else 1
            self.info.forwards += 1
        if cond.shape != latent.shape:
            raise ShapeError(
                f"denoiser output: expected the latent's shape {tuple(latent.shape)}, got {tuple(cond.shape)}"
            )
        self.info.nfe += nfe
        self.info._log(self._step, self._schedule.sigmas[i], used_uncond)
        guided, state = self._guide(self._canonical(cond), self._canonical(uncond), ctx, x)
        if substep == 0:
            self._state = state
        guided = guided if self._is_canonical else from_canonical(guided, layout)
        return guided.to(cond.dtype)

    def _canonical(self, t: Tensor) -> Tensor:
        return t if self._is_canonical else to_canonical(t, self.family.layout)

    def _context(self, x: Tensor, i: int, substep: int) -> GuidanceContext:
        """The context of evaluation ``i`` of the schedule, for canonical latents ``x``."""
        schedule = self._schedule
        assert schedule is not None
        sigma = torch.full((x.shape[0],), schedule.sigmas[i], dtype=torch.float32, device=x.device)
        one_step = schedule.order == 1  # order-2 schedulers repeat levels: they get no schedule
        return GuidanceContext(
            sigma=sigma,
            step=self._step,
            num_steps=-(-(len(schedule.sigmas) - 1) // schedule.order),
            substep=substep,
            sigmas=schedule.tensor.to(x.device) if one_step else None,
            sigma_next=torch.full_like(sigma, schedule.sigmas[i + 1]) if one_step else None,
            space=self._space,  # type: ignore[arg-type]  # None when unknown; only space-aware strategies read it
            x=self._x_for(x, schedule.sigmas[i], sigma),
            allow_nonfinite=self.allow_nonfinite,
        )

    def _x_for(self, x: Tensor, sigma: float, sigmas: Tensor) -> Tensor | None:
        """``ctx.x``: the noisy sample in the coordinates of the strategy's space (loop-api.md §4)."""
        space, coords = self._space, self._schedule.coords  # type: ignore[union-attr]
        if space is None:
            return None
        if (space, coords) in (("v", "vp"), ("flow", "flow")):
            return x  # the model's own input
        x_edm = _edm_x(x, sigma, coords)
        return x_edm if space in ("eps", "x0") else x_for_space(x_edm, sigmas, space)

    def _guide(self, cond: Tensor, uncond: Tensor, ctx: GuidanceContext, x: Tensor) -> tuple[Tensor, Any]:
        """The strategy's step in its own space, converted from and back to the model's space."""
        native, space, state = self.space, self._space, self._step_state
        x_edm = None
        if space != native:
            x_edm = _edm_x(x, float(ctx.sigma[0]), self._schedule.coords)  # type: ignore[union-attr]
            cond = convert(cond, native, space, x_edm, ctx.sigma)  # type: ignore[arg-type]
            uncond = convert(uncond, native, space, x_edm, ctx.sigma)  # type: ignore[arg-type]
        if self._renoise is not None and self._renoise(cond, uncond, ctx) is not None:
            raise ConfigError(
                f"sampler: {type(self.strategy).__name__} re-noises with its own prediction inside the sampler "
                "update, which a diffusers scheduler cannot do; expected a guidekit sampler (sampler='ddim', "
                "'euler', 'flow-euler', ...), got the pipeline's scheduler"
            )
        out, state = self.strategy.step(cond, uncond, ctx, state)
        if x_edm is not None:
            out = convert(out, space, native, x_edm, ctx.sigma)  # type: ignore[arg-type]
        return out, state

    def _state_for(self, substep: int, like: Tensor) -> Any:
        """The strategy state at the start of the current step (corrector evaluations never advance it)."""
        if self._state is _UNSET:
            self._state = self.strategy.init_state(like)
        if substep == 0:
            self._step_state = self._state
        return self._step_state

    def _locate(self, t: float) -> int:
        """Index of timestep ``t`` in the scheduler's timesteps, searching forward from the last match."""
        timesteps = self._schedule.timesteps  # type: ignore[union-attr]
        for i in range(self._cursor, len(timesteps)):
            if timesteps[i] == t:
                self._cursor = i + 1
                return i
        raise GuidekitError(
            f"timestep: expected one of the scheduler's timesteps {timesteps} (from position {self._cursor}), "
            f"got {t}; was the scheduler's set_timesteps called by the pipeline?"
        )

    # -- a guidekit sampler drives ---------------------------------------------------------------------
    def use_sampler(self, sampler: Callable[..., Tensor], shim: SamplerScheduler, options: dict[str, Any]) -> None:
        """Run ``sampler`` over the whole schedule inside the pipeline's first (and only) step."""

        def run_sampler(call: Call) -> Tensor:
            if shim.done:
                raise GuidekitError("sampler: the pipeline evaluated its denoiser again after the guidekit sampler ran")
            model, cond, uncond = call.native_model()
            adapter = shim.adapter(model, self.space, self.family.layout)  # type: ignore[arg-type]
            denoiser = guided(adapter, self.strategy, cond, uncond, allow_nonfinite=self.allow_nonfinite)
            x_start = to_canonical(call.latent()[call.cond].to(torch.float32), self.family.layout)
            sigmas = shim.sigmas_edm
            x = edm_x_from(x_start, sigmas[:1].expand(x_start.shape[0]), shim.coords)
            final = sampler(denoiser, x, sigmas.to(x.device), **options)
            shim.done = True
            self.info.nfe, self.info.forwards = denoiser.nfe, denoiser.forwards
            self.info.steps = [(r.step, r.sigma, r.uncond_used) for r in denoiser.records]
            return adapter.final_x(final).to(call.latent().dtype)

        self.handle = run_sampler


def _strategy_space(
    strategy: GuidanceStrategy, native: PredictionSpace | None, scheduler: Any
) -> PredictionSpace | None:
    """The space the strategy's predictions are in: its own, or the model's for ``any`` / ``native``."""
    if strategy.space in ("any", "native"):
        return native
    if native is None:
        raise ConfigError(
            f"prediction_type: {type(strategy).__name__} works in {strategy.space!r} space, which needs the "
            f"model's prediction type, but the scheduler {type(scheduler).__name__} has no prediction_type in its "
            "config; expected generate(..., prediction_type='eps' | 'v' | 'flow' | 'x0'), got none"
        )
    return strategy.space  # type: ignore[return-value]


def _edm_x(x: Tensor, sigma: float, coords: Coords) -> Tensor:
    """Native latents (VP or flow ``x_t``) -> EDM ``x`` at one sigma (at ``inf``: the limit, ``x`` itself)."""
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if math.isinf(sigma):
        return x
    return x * (math.sqrt(1.0 + sigma * sigma) if coords == "vp" else 1.0 + sigma)


@dataclass(frozen=True)
class _Schedule:
    """The pipeline scheduler's timesteps and EDM sigmas, read once per call (floats, for cheap lookups)."""

    timesteps: list[float]
    sigmas: list[float]
    tensor: Tensor
    order: int
    coords: Coords
    two_stage: bool
    """Whether the scheduler alternates predictor and corrector evaluations (Heun, KDPM2)."""

    @classmethod
    def read(cls, scheduler: Any, space: PredictionSpace | None) -> _Schedule:
        sigmas = noise_schedule(scheduler)
        return cls(
            timesteps=scheduler.timesteps.double().cpu().tolist(),
            sigmas=sigmas.tolist(),
            tensor=sigmas.to(torch.float32),
            order=int(getattr(scheduler, "order", 1)),
            coords="flow" if space == "flow" or is_flow(scheduler) else "vp",
            two_stage=hasattr(scheduler, "state_in_first_order"),
        )
