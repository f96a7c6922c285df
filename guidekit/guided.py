"""The sampler-agnostic guided loop: :func:`guided` turns a model and a strategy into a denoiser; :func:`sample`
runs it on any registered sampler.

A :class:`GuidedDenoiser` is a thin edge over :class:`guidekit.engine.Engine` with a
:class:`~guidekit.engine.NativeBackend`: it turns a sampler's ``(x, sigma, StepInfo)`` into the engine's
:class:`~guidekit.engine.Position` and the engine's answer into ``x0`` (or :class:`Denoised` for a
sampler-coupled strategy). The rules of an evaluation (plan, batching, NFE, spaces, state) are the engine's.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .config import ComponentSpec, build
from .engine import Engine, NativeBackend, Position, StepRecord
from .errors import ConfigError
from .ops.timesteps import flow_sigmas, karras_sigmas, vp_sigmas
from .registry import SAMPLERS
from .samplers.adapters import ModelAdapter, NativeModel, VPModel, adapt
from .samplers.base import Denoised, Generator, SamplerStep, StepInfo
from .strategies.base import GuidanceStrategy
from .strategies.cfg import CFG

__all__ = ["GuidedDenoiser", "StepRecord", "guided", "sample"]


class GuidedDenoiser:
    """A per-run denoiser ``D(x, sigma, info) -> x0`` (or :class:`Denoised`) that applies a strategy.

    Build it with :func:`guided`. The run's state, NFE count and step records live in its
    :attr:`engine`; a run restarted with the same denoiser (step 0 again) starts from a fresh state.
    """

    def __init__(
        self,
        model: ModelAdapter,
        strategy: GuidanceStrategy,
        cond: Any,
        uncond: Any,
        *,
        weak_model: ModelAdapter | None = None,
        conditions: Mapping[str, Any] | None = None,
        allow_nonfinite: bool = False,
        record_scales: bool = False,
        record_scale_maps: bool = False,
        max_batch: int | None = None,
    ) -> None:
        models = {"main": model} if weak_model is None else {"main": model, "weak": weak_model}
        backend = NativeBackend(models, allow_nonfinite=allow_nonfinite)
        self.engine = Engine(
            strategy,
            backend,
            {**dict(conditions or {}), "cond": cond, "uncond": uncond},
            allow_nonfinite=allow_nonfinite,
            record_scales=record_scales,
            record_scale_maps=record_scale_maps,
            max_batch=max_batch,
        )
        self.model, self.weak_model, self.strategy = model, weak_model, strategy
        self._schedule: tuple[Tensor, list[float]] | None = None

    @property
    def space(self) -> str:
        """The prediction space the strategy's math runs in."""
        return self.engine.space

    @property
    def nfe(self) -> int:
        """Network evaluations per sample so far."""
        return self.engine.nfe

    @property
    def forwards(self) -> int:
        """Network calls so far (a batched ``[cond; uncond]`` forward is one call)."""
        return self.engine.forwards

    def __call__(self, x: Tensor, sigma: Tensor, info: StepInfo) -> Tensor | Denoised:
        out = self.engine.evaluate(x, sigma, self._position(info))
        return out.guided if out.renoise is None else Denoised(out.guided, out.renoise)

    def _position(self, info: StepInfo) -> Position:
        if self._schedule is None or self._schedule[0] is not info.sigmas:
            self._schedule = (info.sigmas, info.sigmas.detach().double().cpu().tolist())  # one host copy per run
        values = self._schedule[1]
        return Position(info.step, info.num_steps, info.substep, info.sigmas, values[info.step], values[info.step + 1])

    def record(self, step: int) -> StepRecord:
        """The :class:`StepRecord` of ``step`` (so far)."""
        return self.engine.record(step)

    @property
    def records(self) -> list[StepRecord]:
        """One :class:`StepRecord` per evaluated step, in order."""
        return self.engine.records


def guided(
    model: ModelAdapter,
    strategy: GuidanceStrategy | None = None,
    cond: Any = None,
    uncond: Any = None,
    *,
    weak_model: ModelAdapter | None = None,
    conditions: Mapping[str, Any] | None = None,
    allow_nonfinite: bool = False,
    record_scales: bool = False,
    record_scale_maps: bool = False,
    max_batch: int | None = None,
) -> GuidedDenoiser:
    """A denoiser for any sampler that guides ``model`` with ``strategy`` (one run: build a new one per run).

    Args:
        model: the adapted model (:class:`~guidekit.samplers.VPModel`, ``FlowModel``, ``EDMModel``).
        strategy: the guidance strategy; ``None`` is conditional sampling (``CFG(1)``, one NFE per step).
        cond, uncond: the conditions of the two branches, passed to the model as given (batched together
            as ``[cond; uncond]`` in one forward). Tensors with batch 1 are expanded to the sample batch.
        weak_model: AutoGuidance's "bad version" of the model: the ``"weak"`` branch, evaluated with
            ``cond`` in a separate forward. Refused for a strategy that never evaluates it.
        conditions: extra named conditions for branches that ask for them (``Branch(condition="...")``).
        allow_nonfinite: let NaN/Inf predictions through instead of raising ``NonFiniteError``.
        record_scales: compute ``strategy.scale_map`` statistics for the step records (costs one call).
        record_scale_maps: also keep the maps.
        max_batch: the most rows one forward may take, for memory (``[cond; uncond; perturbed]`` of batch
            ``b`` with ``max_batch = 2b`` runs as two forwards; NFE is unchanged).
    """
    return GuidedDenoiser(
        model,
        CFG(1.0) if strategy is None else strategy,
        cond,
        uncond,
        weak_model=weak_model,
        conditions=conditions,
        allow_nonfinite=allow_nonfinite,
        record_scales=record_scales,
        record_scale_maps=record_scale_maps,
        max_batch=max_batch,
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
    conditions: Mapping[str, Any] | None = None,
    generator: Generator = None,
    progress: bool | None = None,
    callback: Callable[[StepRecord], None] | None = None,
    record_scale_maps: bool = False,
    allow_nonfinite: bool = False,
    sampler_options: Mapping[str, Any] | None = None,
    max_batch: int | None = None,
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
        conditions: extra named conditions for branches that ask for them.
        generator: noise for stochastic samplers; one per sample for batch-independent results.
        progress: show a tqdm bar (``None``: only on a terminal).
        callback: called with a :class:`StepRecord` after every step.
        record_scale_maps: put ``strategy.scale_map`` into the records.
        allow_nonfinite: let NaN/Inf predictions through.
        sampler_options: extra keyword arguments of the sampler (``eta``, ``s_churn``, ...).
        max_batch: the most rows one network forward may take (see :func:`guided`).
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
    options = _check_sampler_options(run, sampler_options)
    if not isinstance(x_T, Tensor) or not x_T.is_floating_point():
        got = x_T.dtype if isinstance(x_T, Tensor) else type(x_T).__name__
        raise ConfigError(f"x_T: expected a floating-point tensor, got {got}")
    _check_generator(generator, x_T.shape[0])
    denoiser = guided(
        adapter,
        strategy,  # type: ignore[arg-type]
        cond,
        uncond,
        weak_model=weak,
        conditions=conditions,
        allow_nonfinite=allow_nonfinite,
        record_scales=callback is not None,
        record_scale_maps=record_scale_maps,
        max_batch=max_batch,
    )
    x = adapter.initial_x(x_T, sigmas[0])
    from tqdm.auto import tqdm

    with tqdm(total=len(sigmas) - 1, disable=None if progress is None else not progress, desc="sampling") as bar:

        def on_step(s: SamplerStep) -> None:
            bar.update(1)
            if callback is not None:
                callback(denoiser.record(s.step))

        x = run(denoiser, x, sigmas, generator=generator, callback=on_step, **options)
    return adapter.final_x(x)


def _schedule(model: ModelAdapter, steps: int | None, schedule: Tensor | Sequence[float] | str | None) -> Tensor:
    if schedule is None or isinstance(schedule, str):
        n = 30 if steps is None else steps
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"steps: expected an integer >= 1, got {n!r}")
        return default_schedule(model, n, schedule)
    try:
        sigmas = torch.as_tensor(schedule, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(
            f"schedule: expected a name, a 1-D tensor or a sequence of EDM sigmas, got {type(schedule).__name__} "
            f"({exc})"
        ) from None
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ConfigError(
            f"schedule: expected a 1-D schedule of at least 2 sigmas ending at 0, got shape {tuple(sigmas.shape)}"
        )
    if steps is not None and sigmas.numel() - 1 != steps:
        raise ConfigError(f"steps: expected len(schedule) - 1 = {sigmas.numel() - 1}, got {steps}")
    return sigmas


def _check_sampler_options(run: Callable[..., Tensor], options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The sampler's keyword options, refused by name when the sampler does not take them."""
    options = dict(options or {})
    try:
        params = inspect.signature(run).parameters
    except (TypeError, ValueError):  # a builtin or C callable: let the sampler itself decide
        return options
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return options
    known = sorted(n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n != "callback")
    unknown = sorted(set(options) - set(known))
    if unknown:
        name = getattr(run, "__name__", type(run).__name__)
        raise ConfigError(f"sampler_options: expected options of {name} ({', '.join(known)}), got {unknown}")
    return options


def _check_generator(generator: Generator, batch: int) -> None:
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, Sequence) and all(isinstance(g, torch.Generator) for g in generator):
        return
    raise ConfigError(
        f"generator: expected None, a torch.Generator or one per sample ({batch}), got {type(generator).__name__}"
    )
