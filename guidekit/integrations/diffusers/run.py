"""The per-call state of ``generate``: the intercepted denoiser and the engine that guides it.

Every evaluation goes through :class:`guidekit.engine.Engine` with a :class:`PipelineBackend` (the pipeline's
own denoiser call, cut to the rows the plan needs); this module only locates an evaluation in the
scheduler's schedule and moves latents between the pipeline's layout and EDM coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ...branch import Branch, NoPerturbation, Perturbation, observation_key
from ...engine import Backend, Engine, Position
from ...engine.observe import observed
from ...engine.perturb import KINDS, applied
from ...errors import ConfigError, GuidekitError, ShapeError
from ...guided import guided
from ...ops.shapes import canonical_layout, check_layout, from_canonical, parse_layout, to_canonical
from ...ops.spaces import PredictionSpace, edm_x_from
from ...strategies.base import GuidanceStrategy
from .calls import Call, pack, zip_cat
from .families import Coords, Family, is_flow, noise_schedule

if TYPE_CHECKING:
    from .stand_in import SamplerScheduler

__all__ = ["GenerationInfo", "GuidedRun", "PipelineBackend"]

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
        _check_strategy_space(strategy, space, scheduler)
        self._backend = PipelineBackend(space, family.layout)
        self._engine = Engine(strategy, self._backend, {}, output="native", allow_nonfinite=allow_nonfinite)
        self._schedule: _Schedule | None = None
        self._is_canonical = canonical_layout(family.layout) == " ".join(parse_layout(family.layout))
        self._cursor = 0
        self._step = -1
        self._step_sigma = 0.0

    # -- interception ---------------------------------------------------------------------------------
    def intercept(self, forward: Callable[..., Any], module: Any = None) -> Callable[..., Any]:
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
                call = Call(forward, args, kwargs, latent_arg, cond=slice(b, 2 * b), uncond=slice(0, b), module=module)
                g = self.handle(call)
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
            g = self.handle(
                Call(forward, merged_args, merged_kwargs, latent_arg, slice(0, b), slice(b, 2 * b), module=module)
            )
            placeholder.copy_(g)
            return pack(g, return_dict)

        return guided_forward

    # -- the pipeline's scheduler drives ----------------------------------------------------------------
    def _scheduler_step(self, call: Call) -> Tensor:
        """One evaluation inside the pipeline's own loop: locate it in the schedule, guide, return ``g``."""
        if self._schedule is None:
            self._schedule = _Schedule.read(self.scheduler, self.space)
            check_layout(call.latent(), self.family.layout, "denoiser latent")
        schedule = self._schedule
        i = self._locate(float(call.timestep().flatten()[0]))
        substep = 0 if not schedule.two_stage or self.scheduler.state_in_first_order else 1
        if substep == 0:
            self._step += 1
            self._step_sigma = schedule.sigmas[i]  # a corrector keeps its step's level (one decision per step)
        latent = call.latent()[call.cond]
        x = self._canonical(latent)
        x_edm = _edm_x(x, schedule.sigmas[i], schedule.coords)
        sigma = torch.full((x.shape[0],), schedule.sigmas[i], dtype=x_edm.dtype, device=x.device)
        one_step = schedule.order == 1  # order-2 schedulers repeat levels: they get no schedule
        position = Position(
            step=self._step,
            num_steps=-(-(len(schedule.sigmas) - 1) // schedule.order),
            substep=substep,
            sigmas=schedule.tensor if one_step else None,
            step_sigma=self._step_sigma,
            sigma_next=schedule.sigmas[i + 1] if one_step else None,
        )
        self._backend.call, self._backend.x, self._backend.coords = call, x_edm, schedule.coords
        out = self._engine.evaluate(x_edm, sigma, position)
        self.info.nfe, self.info.forwards = self._engine.nfe, self._engine.forwards
        record = self._engine.record(self._step)
        self.info._log(self._step, schedule.sigmas[i], record.uncond_used)
        guided = out.guided if self._is_canonical else from_canonical(out.guided, self.family.layout)
        return guided.to(latent.dtype)

    def _canonical(self, t: Tensor) -> Tensor:
        return t if self._is_canonical else to_canonical(t, self.family.layout)

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


def _check_strategy_space(strategy: GuidanceStrategy, native: PredictionSpace | None, scheduler: Any) -> None:
    """A strategy defined in a space of its own needs the model's prediction type to convert into it."""
    if strategy.space not in ("any", "native") and native is None:
        raise ConfigError(
            f"prediction_type: {type(strategy).__name__} works in {strategy.space!r} space, which needs the "
            f"model's prediction type, but the scheduler {type(scheduler).__name__} has no prediction_type in its "
            "config; expected generate(..., prediction_type='eps' | 'v' | 'flow' | 'x0'), got none"
        )


class PipelineBackend(Backend):
    """The pipeline's own denoiser call as an engine backend: the rows of ``call`` the plan needs.

    A plan of ``cond`` and ``uncond`` runs the call exactly as the pipeline made it (its batch order, so
    plain CFG reproduces the pipeline bit for bit); a plan of one branch runs that half only. A group with
    a perturbation (:mod:`guidekit.perturbations`) runs with the denoiser's attention processors swapped
    for the forward (:mod:`.perturb`). Set :attr:`call` before each evaluation. Predictions come back in
    the canonical layout.
    """

    perturbations: ClassVar[frozenset[str]] = frozenset({NoPerturbation.kind}) | KINDS

    def __init__(self, space: PredictionSpace | None, layout: str) -> None:
        self._space, self.layout = space, layout
        self._canonical = canonical_layout(layout) == " ".join(parse_layout(layout))
        self.call: Call | None = None
        self.x: Tensor | None = None
        """The evaluation's EDM sample; a forward at another one (a follow-up stage) moves the call there."""
        self.coords: Coords = "vp"

    def models(self) -> frozenset[str]:
        return frozenset({"main"})

    def prediction(self, model: str) -> PredictionSpace:
        return self._space  # type: ignore[return-value]  # None: unknown, only space-free strategies run

    def forward(
        self, x: Tensor, sigma: Tensor, branches: Sequence[Branch], conditions: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        call = self.call
        if call is None:
            raise GuidekitError("call: expected the intercepted denoiser call before the forward, got none")
        if self.x is not None and x is not self.x:  # a follow-up stage's sample (SAG's x̃): the call at it
            call = call.with_latent(self._latent(x, sigma, call))
        specs = list(dict.fromkeys(b.observe for b in branches if b.observe is not None))
        if not specs:
            return self._run(call, branches)
        with observed(call.module, specs) as record:
            out = self._run(call, branches)
        both = {b.condition for b in branches} == {"cond", "uncond"}
        for branch in branches:
            if branch.observe is not None:
                rows = call.cond if branch.condition == "cond" else call.uncond
                for layer, amap in record[branch.observe].items():
                    out[observation_key(branch.name, layer)] = amap[rows] if both else amap
        return out

    def _latent(self, x: Tensor, sigma: Tensor, call: Call) -> Tensor:
        """EDM ``x`` -> the pipeline's latent (its coordinates and layout, both halves of the call)."""
        s = float(sigma.reshape(-1)[0])
        native = x / (math.sqrt(1.0 + s * s) if self.coords == "vp" else 1.0 + s)
        native = native if self._canonical else from_canonical(native, self.layout)
        native = native.to(call.latent().dtype)
        return torch.cat([native, native])

    def _run(self, call: Call, branches: Sequence[Branch]) -> dict[str, Tensor]:
        rows = {"cond": call.cond, "uncond": call.uncond}
        for branch in branches:
            if branch.condition not in rows:
                raise ConfigError(
                    f"branches: a pipeline's own call has the conditions 'cond' and 'uncond', got branch {branch!r}"
                )
        names = {b.condition for b in branches}
        perturbation = branches[0].group[1]
        if perturbation is not None and perturbation.conditions():
            return self._forward_carrying(call, branches, perturbation)
        with applied(call.module, perturbation):
            pred = call.run(None if names == {"cond", "uncond"} else rows[next(iter(names))])
        expected = call.latent()[call.cond].shape
        out = {}
        for branch in branches:
            part = pred[rows[branch.condition]] if len(names) == 2 else pred
            if part.shape != expected:
                raise ShapeError(
                    f"denoiser output: expected the latent's shape {tuple(expected)}, got {tuple(part.shape)}"
                )
            out[branch.name] = part if self._canonical else to_canonical(part, self.layout)
        return out

    def _forward_carrying(
        self, call: Call, branches: Sequence[Branch], perturbation: Perturbation
    ) -> dict[str, Tensor]:
        """A perturbation that carries a condition (NAG's negative context): the pipeline's whole call, the
        ``cond`` rows the branch, the ``uncond`` rows (the negative prompt) the carried condition."""
        carried = perturbation.conditions()
        if [b.condition for b in branches] != ["cond"] or carried != ("uncond",):
            raise ConfigError(
                f"perturbation: on a pipeline, {perturbation.kind!r} runs the 'cond' branch with the negative "
                f"prompt ('uncond') as its carried condition, got branches {[b.condition for b in branches]} "
                f"carrying {list(carried)}"
            )
        with applied(call.module, perturbation, rows=(call.cond, call.uncond)):
            pred = call.run(None)[call.cond]
        return {branches[0].name: pred if self._canonical else to_canonical(pred, self.layout)}


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
