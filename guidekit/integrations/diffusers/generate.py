"""``generate``: run a diffusers pipeline with a guidekit strategy (and optionally a guidekit sampler)."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from ...errors import ConfigError, GuidekitError, ShapeError
from ...registry import SAMPLERS
from ...strategies.base import GuidanceStrategy
from .families import Family, family_of, parse_prediction_type, prediction_space
from .run import GuidedRun
from .stand_in import SamplerScheduler

__all__ = ["generate"]

_UNSET: Any = object()
_INTERCEPTOR = "__guidekit_interceptor__"

_PIPELINE_SCALE = 2.0
"""The ``guidance_scale`` given to the pipeline. It only has to exceed 1, so that the pipeline encodes the
negative prompt and batches ``[uncond; cond]``. Its combine of ``(g, g)`` returns ``g`` at any scale."""


def _resolve_sampler(sampler: Any) -> tuple[str, Callable[..., Tensor] | None, Any]:
    """``(name, guidekit sampler function or None, diffusers scheduler or None)``."""
    if sampler is None:
        return "pipeline scheduler", None, None
    if isinstance(sampler, SchedulerMixin):
        return type(sampler).__name__, None, sampler
    if isinstance(sampler, str):
        return sampler, SAMPLERS.get(sampler), None
    if callable(sampler):
        return getattr(sampler, "__name__", type(sampler).__name__), sampler, None
    raise ConfigError(
        "sampler: expected None (the pipeline's scheduler), a diffusers scheduler, a guidekit sampler name "
        f"({', '.join(SAMPLERS.names())}) or a sampler function, got {type(sampler).__name__}"
    )


def _check_call(family: Family, kwargs: dict[str, Any]) -> None:
    if "guidance_scale" in kwargs:
        scale = kwargs["guidance_scale"]
        raise ConfigError(
            f"guidance_scale: expected the strategy to set the guidance (e.g. gk.CFG(scale={scale!r})), "
            f"got guidance_scale={scale!r} for the pipeline"
        )
    for name, instead in family.refused:
        if kwargs.get(name):  # None, 0, False and [] leave the pipeline unguided by it
            raise ConfigError(f"{name}: expected it unset with a guidekit strategy ({instead}), got {kwargs[name]!r}")
    for cond_name, uncond_name in (
        ("prompt_embeds", "negative_prompt_embeds"),
        ("pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
    ):
        cond, uncond = kwargs.get(cond_name), kwargs.get(uncond_name)
        if isinstance(cond, Tensor) and isinstance(uncond, Tensor) and cond.shape[0] != uncond.shape[0]:
            raise ShapeError(
                f"{uncond_name}: expected the batch size of {cond_name} ({cond.shape[0]}), got {uncond.shape[0]}"
            )


_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _pipeline_lock(pipe: Any) -> threading.Lock:
    """One lock per pipeline object: ``generate`` patches the pipeline's denoiser and scheduler, so two
    calls on one pipeline take turns (the second waits) instead of mixing their interceptors."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(pipe)
        if lock is None:
            lock = _LOCKS[pipe] = threading.Lock()
        return lock


@contextmanager
def _patched(pipe: Any, run: GuidedRun, family: Family, scheduler: Any) -> Iterator[None]:
    """Install the interceptor on every denoiser (and the scheduler), restoring all of it on exit."""
    models = [getattr(pipe, name, None) for name in family.denoisers]
    models = [m for m in models if m is not None]
    if not models:
        raise ConfigError(f"pipe: expected a denoiser in {family.denoisers}, got none set on {type(pipe).__name__}")
    for m in models:
        if getattr(m.forward, _INTERCEPTOR, False):
            raise GuidekitError(
                f"pipe: expected {type(m).__name__}.forward unpatched, got a guidekit interceptor left by a call "
                "that did not go through generate(); restore it with `del model.forward`"
            )
    saved = [(m, m.__dict__.get("forward", _UNSET)) for m in models]
    old_scheduler = pipe.scheduler
    try:
        for m in models:
            interceptor = run.intercept(m.forward, module=m)
            setattr(interceptor, _INTERCEPTOR, True)
            m.forward = interceptor
        object.__setattr__(pipe, "scheduler", scheduler)  # bypass the pipeline's config bookkeeping
        yield
    finally:
        object.__setattr__(pipe, "scheduler", old_scheduler)
        for m, forward in saved:
            if forward is _UNSET:
                del m.forward
            else:
                m.forward = forward


def generate(
    pipe: Any,
    strategy: GuidanceStrategy,
    *,
    sampler: Any = None,
    sampler_options: dict[str, Any] | None = None,
    prediction_type: str | None = None,
    allow_nonfinite: bool = False,
    return_info: bool = False,
    **pipe_kwargs: Any,
) -> Any:
    """Run ``pipe`` with ``strategy`` guiding every denoiser evaluation, and return what the pipeline returns.

    Prompt encoding, latent preparation and VAE decoding are the pipeline's own. Calls on one pipeline
    from several threads take turns (a per-pipeline lock): its denoiser is patched for the call. ``negative_prompt``
    (or ``negative_prompt_embeds``) is the unconditional branch. Pass everything else the pipeline takes
    (``prompt``, ``num_inference_steps``, ``generator``, ``output_type``, ...) as keywords, but not
    ``guidance_scale``: the strategy guides.

    Args:
        pipe: one of the supported pipelines (:data:`FAMILIES`) or a subclass of one.
        strategy: any guidekit strategy. Its ``needs_uncond`` decides per evaluation whether the
            unconditional half runs.
        sampler: ``None`` uses the pipeline's scheduler. A diffusers scheduler instance is swapped in
            for this call. A guidekit sampler name or function (``"euler"``, ``"dpmpp-2m"``,
            ``"flow-euler"``, ...) runs on the noise schedule of the pipeline's scheduler.
        sampler_options: extra keyword arguments for a guidekit sampler (e.g. ``{"eta": 1.0}``).
            The pipeline's ``generator`` is passed to it unless given here.
        prediction_type: overrides the prediction type read from the scheduler config. It takes the
            guidekit names (``"eps"``, ``"v"``, ``"flow"``, ``"x0"``) or the diffusers ones.
        allow_nonfinite: let NaN/Inf through instead of raising :class:`~guidekit.NonFiniteError`.
        return_info: return ``(output, GenerationInfo)`` instead of the output alone.
    """
    if not isinstance(strategy, GuidanceStrategy):
        raise ConfigError(
            f"strategy: expected a guidekit GuidanceStrategy (e.g. gk.CFG(7.5)), got {type(strategy).__name__}"
        )
    if "weak" in strategy.models():
        raise ConfigError(
            f"strategy: {type(strategy).__name__} evaluates a weak model in place of the unconditional branch, "
            "which a pipeline does not have; expected a strategy without a weak model (use guidekit.sample)"
        )
    family_name, family = family_of(pipe)
    _check_call(family, pipe_kwargs)
    name, sampler_fn, scheduler = _resolve_sampler(sampler)
    scheduler = scheduler if scheduler is not None else pipe.scheduler
    space = parse_prediction_type(prediction_type) if prediction_type is not None else prediction_space(scheduler)
    run = GuidedRun(family_name, family, strategy, space, scheduler, name, allow_nonfinite)
    if sampler_fn is not None:
        if space is None:
            raise ConfigError(
                f"prediction_type: a guidekit sampler needs the model's prediction type, but "
                f"{type(scheduler).__name__} has none in its config; expected prediction_type='eps' | 'v' | "
                "'flow' | 'x0', got none"
            )
        if getattr(pipe, "transformer_2", None) is not None:
            raise ConfigError(
                "sampler: expected the pipeline's scheduler (sampler=None) for a two-expert Wan 2.2 pipeline, whose "
                f"expert switch lives in the pipeline's loop; got sampler={name!r}"
            )
        options = dict(sampler_options or {})
        options.setdefault("generator", pipe_kwargs.get("generator"))
        scheduler = SamplerScheduler(scheduler)
        run.use_sampler(sampler_fn, scheduler, options)
    elif strategy.sampler_coupled:
        raise ConfigError(
            f"sampler: {type(strategy).__name__} re-noises with its own prediction inside the sampler update, "
            "which a diffusers scheduler cannot do; expected a guidekit sampler (sampler='ddim', 'euler', "
            "'flow-euler', ...), got the pipeline's scheduler"
        )
    if sampler_fn is None and sampler_options:
        raise ConfigError(f"sampler_options: expected them only with a guidekit sampler, got {sampler_options!r}")
    with _pipeline_lock(pipe), _patched(pipe, run, family, scheduler):
        output = pipe(**pipe_kwargs, guidance_scale=_PIPELINE_SCALE)
    return (output, run.info) if return_info else output
