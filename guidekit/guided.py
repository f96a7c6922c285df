"""The sampler-agnostic guided loop: :func:`guided` turns a model and a strategy into a denoiser; :func:`sample`
runs it on any registered sampler.

One evaluation (design.md "Data flow")::

    ctx = GuidanceContext(sigma, step, substep, sigmas, sigma_next, space, x)
    needs_uncond_state(ctx, state)?  yes: one forward of [x; x] with [cond; uncond]   (2 NFE)
                                      no:  a conditional forward only                 (1 NFE)
    c, u  -> strategy.space (methods.md §2, same x)  -> strategy.step(c, u, ctx, state) -> x0 (or x0 + eps)

The strategy object is never mutated: the per-run state lives in the :class:`GuidedDenoiser`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .config import ComponentSpec, build
from .context import GuidanceContext, PredictionSpace
from .errors import ConfigError, ShapeError
from .ops.spaces import convert, to_x0, x_for_space
from .ops.timesteps import flow_sigmas, karras_sigmas, vp_sigmas
from .registry import SAMPLERS
from .samplers.adapters import ModelAdapter, NativeModel, VPModel, adapt
from .samplers.base import Denoised, Generator, SamplerStep, StepInfo
from .strategies.base import GuidanceStrategy, nested_strategies, sampler_coupled
from .strategies.cfg import CFG

__all__ = ["GuidedDenoiser", "StepRecord", "guided", "sample"]

_UNSET = object()


@dataclass(frozen=True)
class StepRecord:
    """What happened in one sampler step (all of its evaluations).

    Attributes:
        step: step index; ``sigma`` -> ``sigma_next`` its EDM noise levels.
        nfe: network evaluations per sample so far, this step included (a batched ``[cond; uncond]``
            forward counts 2, a skipped network counts 0).
        uncond_used: whether any evaluation of this step ran the unconditional (or weak) branch.
        model_called: whether the network ran at all this step (False on CFG-Zero*'s zero-init steps).
        scale_mean, scale_min, scale_max: statistics of ``strategy.scale_map`` at the step's first
            evaluation, over the batch; ``None`` when the strategy has no scale map or did not guide.
        scale_map: the map itself (detached), only with ``record_scale_maps=True``.
    """

    step: int
    sigma: float
    sigma_next: float
    nfe: int
    uncond_used: bool
    model_called: bool
    scale_mean: float | None = None
    scale_min: float | None = None
    scale_max: float | None = None
    scale_map: Tensor | None = None


@dataclass
class _StepLog:
    sigma: float
    sigma_next: float
    nfe: int = 0
    uncond_used: bool = False
    model_called: bool = False
    scales: tuple[float, float, float] | None = None
    scale_map: Tensor | None = None


# -- conditions --------------------------------------------------------------------------------------------
def batch_cond(cond: Any, batch: int, name: str = "cond") -> Any:
    """Check a (nested) condition has batch ``batch`` in every tensor's first dim; expand batch-1 tensors."""
    if isinstance(cond, Tensor):
        if cond.ndim == 0:
            return cond
        if cond.shape[0] == batch:
            return cond
        if cond.shape[0] == 1:
            return cond.expand(batch, *cond.shape[1:])
        raise ShapeError(f"{name}: expected batch size {batch} (or 1) in the first dim, got shape {tuple(cond.shape)}")
    if isinstance(cond, Mapping):
        return type(cond)({k: batch_cond(v, batch, f"{name}[{k!r}]") for k, v in cond.items()})  # type: ignore[call-arg]
    if isinstance(cond, tuple | list):
        return type(cond)(batch_cond(v, batch, f"{name}[{i}]") for i, v in enumerate(cond))
    return cond


def concat_cond(cond: Any, uncond: Any, name: str = "uncond") -> Any:
    """``[cond; uncond]`` along the batch, leaf by leaf; non-tensor leaves must be equal."""
    if isinstance(cond, Tensor) and isinstance(uncond, Tensor):
        if cond.ndim == 0 or cond.shape[1:] != uncond.shape[1:]:
            raise ShapeError(f"{name}: expected the shape of cond {tuple(cond.shape)}, got {tuple(uncond.shape)}")
        return torch.cat([cond, uncond.to(device=cond.device, dtype=cond.dtype)])
    if isinstance(cond, Mapping) and isinstance(uncond, Mapping):
        if set(cond) != set(uncond):
            raise ConfigError(f"{name}: expected the keys of cond {sorted(cond)}, got {sorted(uncond)}")
        return type(cond)({k: concat_cond(cond[k], uncond[k], f"{name}[{k!r}]") for k in cond})  # type: ignore[call-arg]
    if isinstance(cond, tuple | list) and isinstance(uncond, tuple | list) and len(cond) == len(uncond):
        return type(cond)(concat_cond(a, b, f"{name}[{i}]") for i, (a, b) in enumerate(zip(cond, uncond, strict=True)))
    if type(cond) is type(uncond) and not isinstance(cond, Tensor) and cond == uncond:
        return cond
    raise ShapeError(
        f"{name}: expected the same structure as cond ({type(cond).__name__}), got {type(uncond).__name__}"
    )


def _split(t: Tensor, b: int) -> tuple[Tensor, Tensor]:
    return t[:b], t[b:]


def _requires_weak_model(strategy: Any) -> bool:
    """Whether ``strategy`` or a strategy nested in it sets ``requires_weak_model`` (AutoGuidance)."""
    return bool(getattr(strategy, "requires_weak_model", False)) or any(
        map(_requires_weak_model, nested_strategies(strategy))
    )


def _check_renoise_forwarded(strategy: Any) -> None:
    """Refuse a combinator that hides a sampler-coupled strategy's re-noising (CFG++ inside Interval, ...)."""
    for child in nested_strategies(strategy):
        if sampler_coupled(child) and not callable(getattr(strategy, "renoise_prediction", None)):
            raise ConfigError(
                f"strategy: expected {type(strategy).__name__} to forward renoise_prediction, since it wraps the "
                f"sampler-coupled {type(child).__name__}; got a combinator without it (its re-noising would be "
                "silently lost)"
            )
        _check_renoise_forwarded(child)


# -- the guided denoiser -----------------------------------------------------------------------------------
class GuidedDenoiser:
    """A per-run denoiser ``D(x, sigma, info) -> x0`` (or :class:`Denoised`) that applies a strategy.

    Build it with :func:`guided`. It holds the run's strategy state, the NFE count and the step log.
    Every evaluation of step ``i`` starts from the state at the start of step ``i``; only the state
    returned by the step's first evaluation (``substep == 0``) is kept, so corrector evaluations never
    advance it.
    """

    def __init__(
        self,
        model: ModelAdapter,
        strategy: GuidanceStrategy,
        cond: Any,
        uncond: Any,
        *,
        weak_model: ModelAdapter | None = None,
        allow_nonfinite: bool = False,
        record_scales: bool = False,
        record_scale_maps: bool = False,
    ) -> None:
        if not isinstance(strategy, GuidanceStrategy):
            raise ConfigError(f"strategy: expected a GuidanceStrategy, got {type(strategy).__name__}")
        if weak_model is None and _requires_weak_model(strategy):
            raise ConfigError(
                f"weak_model: expected the weak (guiding) model, since {type(strategy).__name__} evaluates it in "
                "place of the unconditional branch (AutoGuidance); got None"
            )
        _check_renoise_forwarded(strategy)
        self.model, self.weak_model, self.strategy = model, weak_model, strategy
        self.cond, self.uncond = cond, uncond
        self.space: PredictionSpace = self._resolve_space()
        self.allow_nonfinite = allow_nonfinite
        self.record_scales = record_scales or record_scale_maps
        self.record_scale_maps = record_scale_maps
        self.nfe = 0
        """Network evaluations per sample so far."""
        self.forwards = 0
        """Network calls so far (a batched ``[cond; uncond]`` forward is one call)."""
        self._state: Any = _UNSET
        self._step_state: Any = _UNSET
        self._step = -1
        self._log: dict[int, _StepLog] = {}

    def _resolve_space(self) -> PredictionSpace:
        space = self.strategy.space
        if space in ("any", "native"):
            weak = self.weak_model
            if space == "native" and weak is not None and weak.prediction != self.model.prediction:
                raise ConfigError(
                    f"weak_model: expected prediction {self.model.prediction!r} like the model, since strategy "
                    f"{type(self.strategy).__name__} works in the native space; got {weak.prediction!r}"
                )
            return self.model.prediction
        return space  # type: ignore[return-value]

    # -- one evaluation ----------------------------------------------------------------------------
    def __call__(self, x: Tensor, sigma: Tensor, info: StepInfo) -> Tensor | Denoised:
        b = x.shape[0]
        sigma = sigma.to(device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        state = self._state_for(info, x)
        ctx = GuidanceContext(
            sigma=sigma,
            step=info.step,
            num_steps=info.num_steps,
            substep=info.substep,
            sigmas=info.sigmas,
            sigma_next=info.sigma_next.to(sigma).expand(b),
            space=self.space,
            x=x_for_space(x, sigma, self.space),
            allow_nonfinite=self.allow_nonfinite,
        )
        log = self._log.setdefault(info.step, _StepLog(float(info.sigmas[info.step]), float(info.sigma_next)))
        skips_model = getattr(self.strategy, "skips_model", None)
        if skips_model is not None and skips_model(ctx):
            pred_cond = pred_uncond = torch.zeros_like(x)  # placeholders: the strategy does not read them
            need_uncond = False
        else:
            need_uncond = bool(self.strategy.needs_uncond_state(ctx, state))
            pred_cond, pred_uncond = self._predict(x, sigma, need_uncond)
            log.model_called = True
        guided, new_state = self.strategy.step(pred_cond, pred_uncond, ctx, state)
        if info.substep == 0:
            self._state = new_state
            if need_uncond and self.record_scales:
                self._record_scales(log, pred_cond, pred_uncond, ctx)
        log.uncond_used |= need_uncond
        log.nfe = self.nfe
        x0 = to_x0(guided, self.space, x, sigma)
        renoise = getattr(self.strategy, "renoise_prediction", None)
        direction = renoise(pred_cond, pred_uncond, ctx) if renoise is not None else None
        if direction is None:
            return x0
        return Denoised(x0, convert(direction, self.space, "eps", x, sigma))

    def _state_for(self, info: StepInfo, like: Tensor) -> Any:
        if self._state is _UNSET:
            self._state = self.strategy.init_state(like)
        if info.substep == 0 and info.step != self._step:
            self._step, self._step_state = info.step, self._state
        return self._step_state if self._step == info.step else self._state

    def _predict(self, x: Tensor, sigma: Tensor, need_uncond: bool) -> tuple[Tensor, Tensor]:
        """The conditional and unconditional (or weak) predictions in ``self.space``."""
        b, model, weak = x.shape[0], self.model, self.weak_model
        cond = batch_cond(self.cond, b, "cond")
        kw = {"allow_nonfinite": self.allow_nonfinite}
        if need_uncond and weak is None and self.uncond is None:
            raise ConfigError(
                f"uncond: expected the unconditional condition, since {type(self.strategy).__name__} needs the "
                "unconditional branch at this step; got None"
            )
        if not need_uncond:
            pred_c = model.predict(x, sigma, cond, **kw)
            self.nfe, self.forwards = self.nfe + 1, self.forwards + 1
            pred_c = convert(pred_c, model.prediction, self.space, x, sigma)
            return pred_c, pred_c
        if weak is not None:  # AutoGuidance: a second network in place of the unconditional branch
            weak_cond = cond if self.uncond is None else batch_cond(self.uncond, b, "uncond")
            pred_c = model.predict(x, sigma, cond, **kw)
            pred_u = weak.predict(x, sigma, weak_cond, **kw)
            self.nfe, self.forwards = self.nfe + 2, self.forwards + 2
            return (
                convert(pred_c, model.prediction, self.space, x, sigma),
                convert(pred_u, weak.prediction, self.space, x, sigma),
            )
        both = concat_cond(cond, batch_cond(self.uncond, b, "uncond"))
        pred = model.predict(torch.cat([x, x]), torch.cat([sigma, sigma]), both, **kw)
        self.nfe, self.forwards = self.nfe + 2, self.forwards + 1
        pred_c, pred_u = _split(pred, b)
        to = self.space
        return convert(pred_c, model.prediction, to, x, sigma), convert(pred_u, model.prediction, to, x, sigma)

    def _record_scales(self, log: _StepLog, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> None:
        scale = self.strategy.scale_map(pred_cond, pred_uncond, ctx)
        if scale is None:
            return
        scale = scale.detach().float()
        log.scales = (float(scale.mean()), float(scale.min()), float(scale.max()))
        if self.record_scale_maps:
            log.scale_map = scale.clone()

    # -- records ------------------------------------------------------------------------------------
    def record(self, step: int) -> StepRecord:
        """The :class:`StepRecord` of ``step`` (so far)."""
        if step not in self._log:
            raise ConfigError(f"step: expected one of the evaluated steps {sorted(self._log)}, got {step}")
        log = self._log[step]
        mean, lo, hi = log.scales if log.scales is not None else (None, None, None)
        return StepRecord(
            step, log.sigma, log.sigma_next, log.nfe, log.uncond_used, log.model_called, mean, lo, hi, log.scale_map
        )

    @property
    def records(self) -> list[StepRecord]:
        """One :class:`StepRecord` per evaluated step, in order."""
        return [self.record(i) for i in sorted(self._log)]


def guided(
    model: ModelAdapter,
    strategy: GuidanceStrategy | None = None,
    cond: Any = None,
    uncond: Any = None,
    *,
    weak_model: ModelAdapter | None = None,
    allow_nonfinite: bool = False,
    record_scales: bool = False,
    record_scale_maps: bool = False,
) -> GuidedDenoiser:
    """A denoiser for any sampler that guides ``model`` with ``strategy`` (one run: build a new one per run).

    Args:
        model: the adapted model (:class:`~guidekit.samplers.VPModel`, ``FlowModel``, ``EDMModel``).
        strategy: the guidance strategy; ``None`` is conditional sampling (``CFG(1)``, one NFE per step).
        cond, uncond: the conditions of the two branches, passed to the model as given (batched together
            as ``[cond; uncond]`` in one forward). Tensors with batch 1 are expanded to the sample batch.
        weak_model: AutoGuidance's "bad version" of the model; evaluated (with ``uncond`` if given, else
            ``cond``) in place of the unconditional branch, in a separate forward.
        allow_nonfinite: let NaN/Inf predictions through instead of raising ``NonFiniteError``.
        record_scales: compute ``strategy.scale_map`` statistics for the step records (costs one call).
        record_scale_maps: also keep the maps.
    """
    return GuidedDenoiser(
        model,
        CFG(1.0) if strategy is None else strategy,
        cond,
        uncond,
        weak_model=weak_model,
        allow_nonfinite=allow_nonfinite,
        record_scales=record_scales,
        record_scale_maps=record_scale_maps,
    )


# -- the one-call entry ----------------------------------------------------------------------------------
def default_schedule(model: ModelAdapter, steps: int, schedule: str | None = None) -> Tensor:
    """EDM sigmas for ``model``: ``"karras"`` (default for VP/EDM, over the model's sigma range),
    ``"leading"``/``"trailing"``/``"linspace"`` (VP timesteps as diffusers' DDIM), ``"flow"`` (default for flow)."""
    is_vp = isinstance(model, VPModel)
    name = schedule or ("flow" if model.coords == "flow" else "karras")
    if name == "flow" and model.coords == "flow":
        return flow_sigmas(steps)
    if name in ("leading", "trailing", "linspace") and is_vp:
        return vp_sigmas(model.alphas_cumprod, steps, name)  # type: ignore[attr-defined,arg-type]
    if name == "karras" and model.coords != "flow":
        if is_vp and model.sigma_max == float("inf"):  # type: ignore[attr-defined]
            raise ConfigError(
                "schedule: 'karras' needs a finite sigma_max; got a zero-terminal-SNR model, use 'trailing'"
            )
        lo, hi = (model.sigma_min, model.sigma_max) if is_vp else (0.002, 80.0)  # type: ignore[attr-defined]
        return karras_sigmas(steps, lo, hi)
    allowed = (
        "'karras', 'leading', 'trailing', 'linspace'" if is_vp else "'flow'" if model.coords == "flow" else "'karras'"
    )
    raise ConfigError(f"schedule: expected a sigma tensor or one of {allowed} for {type(model).__name__}, got {name!r}")


def sample(
    model: NativeModel | ModelAdapter,
    x_T: Tensor,
    *,
    sampler: str | Callable[..., Tensor] = "euler",
    steps: int | None = None,
    strategy: GuidanceStrategy | ComponentSpec | Mapping[str, Any] | str | None = None,
    cond: Any = None,
    uncond: Any = None,
    prediction: str = "eps",
    schedule: Tensor | Sequence[float] | str | None = None,
    layout: str | None = None,
    alphas_cumprod: Tensor | None = None,
    time_scale: float = 1.0,
    weak_model: NativeModel | ModelAdapter | None = None,
    generator: Generator = None,
    progress: bool | None = None,
    callback: Callable[[StepRecord], None] | None = None,
    record_scale_maps: bool = False,
    allow_nonfinite: bool = False,
    sampler_options: Mapping[str, Any] | None = None,
) -> Tensor:
    """Sample from ``model`` with guidance, in one call. Returns the clean sample in the model's layout.

    Args:
        model: a native ``model(x, t, cond)`` (adapted with ``prediction``, ``alphas_cumprod``,
            ``time_scale``, ``layout``; see :func:`guidekit.samplers.adapt`) or a ready adapter.
        x_T: the starting noise in the model's layout and coordinates (``randn`` for VP and flow models).
        sampler: a registered name (``guidekit.samplers.names()``) or a sampler function.
        steps: number of steps (default 30); with an explicit ``schedule`` tensor, its length minus one.
        strategy: a strategy, or a spec for :func:`guidekit.build`; ``None`` = conditional only.
        cond, uncond: conditions (see :func:`guided`).
        prediction: ``"eps"``, ``"v"``, ``"x0"`` (VP), ``"flow"`` (rectified flow) or ``"edm"``.
        schedule: EDM sigmas ending at 0, or a name (:func:`default_schedule`).
        layout: the model's layout (``"b c h w"`` when not given, ``"b c f h w"``, ``"b f c h w"``, ...); an
            adapter brings its own.
        weak_model: AutoGuidance's weak model (native or adapter), in place of the unconditional branch.
        generator: noise for stochastic samplers; one per sample for batch-independent results.
        progress: show a tqdm bar (``None``: only on a terminal).
        callback: called with a :class:`StepRecord` after every step.
        record_scale_maps: put ``strategy.scale_map`` into the records.
        allow_nonfinite: let NaN/Inf predictions through.
        sampler_options: extra keyword arguments of the sampler (``eta``, ``s_churn``, ...).
    """
    if isinstance(model, ModelAdapter) and layout is not None and layout != model.layout:
        raise ConfigError(f"layout: expected the adapter's layout {model.layout!r} (or None), got {layout!r}")
    edge = {"alphas_cumprod": alphas_cumprod, "time_scale": time_scale, "layout": layout or "b c h w"}
    adapter = adapt(model, prediction, **edge)
    weak = None
    if weak_model is not None:
        weak = adapt(weak_model, prediction, **{**edge, "layout": adapter.layout})
    if strategy is not None and not isinstance(strategy, GuidanceStrategy):
        strategy = build(strategy, where="strategy")
    sigmas = _schedule(adapter, steps, schedule)
    run = SAMPLERS.get(sampler) if isinstance(sampler, str) else sampler
    if not callable(run):
        raise ConfigError(f"sampler: expected a registered name or a sampler function, got {sampler!r}")
    denoiser = guided(
        adapter,
        strategy,  # type: ignore[arg-type]
        cond,
        uncond,
        weak_model=weak,
        allow_nonfinite=allow_nonfinite,
        record_scales=callback is not None,
        record_scale_maps=record_scale_maps,
    )
    x = adapter.initial_x(x_T, sigmas[0])
    from tqdm.auto import tqdm

    with tqdm(total=len(sigmas) - 1, disable=None if progress is None else not progress, desc="sampling") as bar:

        def on_step(s: SamplerStep) -> None:
            bar.update(1)
            if callback is not None:
                callback(denoiser.record(s.step))

        x = run(denoiser, x, sigmas, generator=generator, callback=on_step, **dict(sampler_options or {}))
    return adapter.final_x(x)


def _schedule(model: ModelAdapter, steps: int | None, schedule: Tensor | Sequence[float] | str | None) -> Tensor:
    if schedule is None or isinstance(schedule, str):
        n = 30 if steps is None else steps
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"steps: expected an integer >= 1, got {n!r}")
        return default_schedule(model, n, schedule)
    sigmas = torch.as_tensor(schedule, dtype=torch.float64)
    if steps is not None and sigmas.ndim == 1 and sigmas.numel() - 1 != steps:
        raise ConfigError(f"steps: expected len(schedule) - 1 = {sigmas.numel() - 1}, got {steps}")
    return sigmas
