"""The per-call state of ``generate``: the intercepted denoiser, the strategy's state and the NFE count."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ...context import GuidanceContext, PredictionSpace
from ...errors import ConfigError, GuidekitError, ShapeError
from ...guided import guided
from ...layout import from_canonical, to_canonical
from ...samplers.conversions import convert, edm_x_from, x_for_space
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
        self._sigmas: Tensor | None = None
        self._order = 1
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
        scheduler = self.scheduler
        if self._sigmas is None:
            self._sigmas = noise_schedule(scheduler)
            self._order = int(getattr(scheduler, "order", 1))
        i = self._locate(call.timestep())
        substep = 0 if getattr(scheduler, "state_in_first_order", True) else 1
        self._step += substep == 0
        sigma = float(self._sigmas[i])
        x = call.latent()[call.cond]
        b, layout = x.shape[0], self.family.layout
        sig = torch.full((b,), sigma, dtype=torch.float32, device=x.device)
        one_step = self._order == 1  # the schedule of order-2 schedulers repeats levels; give no schedule then
        ctx = GuidanceContext(
            sigma=sig,
            step=self._step,
            num_steps=-(-(len(self._sigmas) - 1) // self._order),
            substep=substep,
            sigmas=self._sigmas.to(device=x.device, dtype=torch.float32) if one_step else None,
            sigma_next=torch.full_like(sig, float(self._sigmas[i + 1])) if one_step else None,
            space=self.space,  # type: ignore[arg-type]  # None when unknown; only space-aware strategies read it
            allow_nonfinite=self.allow_nonfinite,
        )
        coords: Coords = "flow" if self.space == "flow" or is_flow(scheduler) else "vp"
        x_edm = to_canonical(edm_x_from(x.to(torch.float32), sig, coords), layout)
        state = self._state_for(substep, to_canonical(x, layout))
        skips = getattr(self.strategy, "skips_model", None)
        if skips is not None and skips(ctx):
            cond = uncond = torch.zeros_like(x)  # CFG-Zero*'s zero-init: the strategy does not read them
            used_uncond, nfe = False, 0
        else:
            used_uncond = bool(self.strategy.needs_uncond_state(ctx, state))
            pred = call.run(cond_only=not used_uncond)
            cond, uncond = (pred[call.cond], pred[call.uncond]) if used_uncond else (pred, pred)
            nfe = 2 if used_uncond else 1
            self.info.forwards += 1
        if cond.shape != x.shape:
            raise ShapeError(f"denoiser output: expected the latent's shape {tuple(x.shape)}, got {tuple(cond.shape)}")
        self.info.nfe += nfe
        self.info._log(self._step, sigma, used_uncond)
        guided, state = self._combine(to_canonical(cond, layout), to_canonical(uncond, layout), ctx, x_edm, state)
        if substep == 0:
            self._state = state
        return from_canonical(guided, layout).to(cond.dtype)

    def _state_for(self, substep: int, like: Tensor) -> Any:
        """The strategy state at the start of the current step (corrector evaluations never advance it)."""
        if self._state is _UNSET:
            self._state = self.strategy.init_state(like)
        if substep == 0:
            self._step_state = self._state
        return self._step_state

    def _locate(self, timestep: Tensor) -> int:
        """Index of ``timestep`` in the scheduler's timesteps, searching forward from the last match."""
        t = float(timestep.flatten()[0])
        timesteps = self.scheduler.timesteps.double().cpu()
        hits = torch.nonzero(timesteps[self._cursor :] == t)
        if len(hits) == 0:
            raise GuidekitError(
                f"timestep: expected one of the scheduler's timesteps {timesteps.tolist()} (from position "
                f"{self._cursor}), got {t}; was the scheduler's set_timesteps called by the pipeline?"
            )
        i = self._cursor + int(hits[0])
        self._cursor = i + 1
        return i

    def _combine(
        self, cond: Tensor, uncond: Tensor, ctx: GuidanceContext, x_edm: Tensor, state: Any
    ) -> tuple[Tensor, Any]:
        """The strategy's step in its own space, converted from and back to the model's space."""
        native, target = self.space, self.strategy.space
        renoise = getattr(self.strategy, "renoise_prediction", None)
        if renoise is not None and renoise(cond, uncond, ctx) is not None:
            raise ConfigError(
                f"sampler: {type(self.strategy).__name__} re-noises with its own prediction inside the sampler "
                "update, which a diffusers scheduler cannot do; expected a guidekit sampler (sampler='ddim', "
                "'euler', 'flow-euler', ...), got the pipeline's scheduler"
            )
        if target in ("any", "native") or target == native:
            x = x_for_space(x_edm, ctx.sigma, native) if native is not None else None
            return self.strategy.step(cond, uncond, ctx.replace(x=x), state)
        if native is None:
            raise ConfigError(
                f"prediction_type: {type(self.strategy).__name__} works in {target!r} space, which needs the "
                f"model's prediction type, but the scheduler {type(self.scheduler).__name__} has no prediction_type "
                "in its config; expected generate(..., prediction_type='eps' | 'v' | 'flow' | 'x0'), got none"
            )
        c = convert(cond, native, target, x_edm, ctx.sigma)  # type: ignore[arg-type]
        u = convert(uncond, native, target, x_edm, ctx.sigma)  # type: ignore[arg-type]
        ctx = ctx.replace(space=target, x=x_for_space(x_edm, ctx.sigma, target))  # type: ignore[arg-type]
        out, state = self.strategy.step(c, u, ctx, state)
        return convert(out, target, native, x_edm, ctx.sigma), state  # type: ignore[arg-type]

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
