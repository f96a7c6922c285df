"""The per-family table, prediction types and noise levels of diffusers pipelines and schedulers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ...context import PredictionSpace
from ...errors import ConfigError
from ...ops.spaces import sigma_from_alphas_cumprod, sigma_from_flow_t

__all__ = [
    "FAMILIES",
    "Coords",
    "Family",
    "family_of",
    "is_flow",
    "latent_coords",
    "noise_schedule",
    "parse_prediction_type",
    "prediction_space",
    "register_family",
]

Coords = Literal["vp", "flow", "edm"]

# -- the per-family table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """The facts that differ between pipeline families. Each is one row of :data:`FAMILIES`.

    Attributes:
        denoisers: the pipeline attributes that hold denoisers. Wan 2.2 has a second expert,
            ``transformer_2``; a ``None`` attribute is skipped.
        layout: the latent layout the denoiser sees, as einops axes. CogVideoX uses ``"b f c h w"``;
            Wan and ModelScope use ``"b c f h w"``.
        latent_arg: the name of the denoiser's latent argument. It is used when the latent is passed by
            keyword; otherwise the latent is positional argument 0.
        cfg_call: ``"batched"`` means one call on ``[uncond; cond]``. ``"sequential"`` means a cond call
            and then an uncond call, which are merged here into one ``[cond; uncond]`` forward.
        refused: pipeline arguments that would guide on top of the strategy, each paired with what to
            use instead.
    """

    denoisers: tuple[str, ...]
    layout: str
    latent_arg: str
    cfg_call: Literal["batched", "sequential"] = "batched"
    refused: tuple[tuple[str, str], ...] = ()


_RESCALE = ("guidance_rescale", "wrap the strategy in guidekit's Rescale")

FAMILIES: dict[str, Family] = {
    "StableDiffusionPipeline": Family(("unet",), "b c h w", "sample", refused=(_RESCALE,)),
    "StableDiffusionXLPipeline": Family(("unet",), "b c h w", "sample", refused=(_RESCALE,)),
    "StableDiffusion3Pipeline": Family(
        ("transformer",),
        "b c h w",
        "hidden_states",
        refused=(("skip_guidance_layers", "guidekit does not run skip-layer passes; leave it unset"),),
    ),
    "CogVideoXPipeline": Family(
        ("transformer",),
        "b f c h w",
        "hidden_states",
        refused=(("use_dynamic_cfg", "use a guidekit scale schedule"),),
    ),
    "WanPipeline": Family(
        ("transformer", "transformer_2"),
        "b c f h w",
        "hidden_states",
        cfg_call="sequential",
        refused=(("guidance_scale_2", "one strategy guides both experts"),),
    ),
    "TextToVideoSDPipeline": Family(("unet",), "b c f h w", "sample"),
}
"""Supported pipeline classes, by class name. Subclasses are matched through their MRO."""


def register_family(pipeline_class: str | type, family: Family, *, override: bool = False) -> None:
    """Teach :func:`generate` a pipeline class. This is the only step needed for a pipeline that
    calls its denoiser on ``[uncond; cond]`` or in cond/uncond order."""
    name = pipeline_class if isinstance(pipeline_class, str) else pipeline_class.__name__
    if not isinstance(family, Family):
        raise ConfigError(f"family: expected a guidekit.integrations.diffusers.Family, got {type(family).__name__}")
    if name in FAMILIES and not override:
        raise ConfigError(f"pipeline_class: {name!r} is already registered; pass override=True to replace it")
    FAMILIES[name] = family


def family_of(pipe: Any) -> tuple[str, Family]:
    """``(class name, family)`` of ``pipe``. An unsupported class raises, listing the supported ones."""
    for klass in type(pipe).__mro__:
        if klass.__name__ in FAMILIES:
            return klass.__name__, FAMILIES[klass.__name__]
    raise ConfigError(
        f"pipe: expected one of the supported pipelines ({', '.join(sorted(FAMILIES))}), got "
        f"{type(pipe).__name__} (register it with guidekit.integrations.diffusers.register_family)"
    )


# -- prediction types and noise levels -------------------------------------------------------------------

_PREDICTION_TYPES: dict[str, PredictionSpace] = {
    "epsilon": "eps",
    "v_prediction": "v",
    "sample": "x0",
    "flow_prediction": "flow",
    "eps": "eps",
    "v": "v",
    "x0": "x0",
    "flow": "flow",
}


def is_flow(scheduler: Any) -> bool:
    config = getattr(scheduler, "config", {})
    return (
        type(scheduler).__name__.startswith("FlowMatch")
        or bool(config.get("use_flow_sigmas", False))
        or config.get("prediction_type") == "flow_prediction"
    )


def prediction_space(scheduler: Any) -> PredictionSpace | None:
    """The model's prediction space, read from the scheduler config (``None`` if it cannot be told).

    FlowMatch schedulers (and ``use_flow_sigmas``) mean ``"flow"``. Otherwise ``prediction_type`` maps
    ``epsilon`` to ``"eps"``, ``v_prediction`` to ``"v"`` and ``sample`` to ``"x0"``.
    """
    if is_flow(scheduler):
        return "flow"
    return _PREDICTION_TYPES.get(getattr(scheduler, "config", {}).get("prediction_type"))


def parse_prediction_type(value: str) -> PredictionSpace:
    if value not in _PREDICTION_TYPES:
        raise ConfigError(f"prediction_type: expected one of {', '.join(_PREDICTION_TYPES)}, got {value!r}")
    return _PREDICTION_TYPES[value]


def latent_coords(scheduler: Any) -> Coords:
    """The coordinates the scheduler keeps its latents in.

    Flow schedulers use ``x_t``. k-diffusion-style schedulers (Euler, Heun, LMS) use EDM ``x``, which
    they scale by ``1/sqrt(1+sigma^2)`` for the model. DDIM, DPM-Solver and UniPC use VP ``x_t``.
    """
    if is_flow(scheduler):
        return "flow"
    probe = type(scheduler).from_config(scheduler.config)
    probe.set_timesteps(2)
    scaled = probe.scale_model_input(torch.ones(1), probe.timesteps[0])
    return "vp" if float(scaled) == 1.0 else "edm"


def noise_schedule(scheduler: Any) -> Tensor:
    """EDM sigma at each of ``scheduler.timesteps`` plus the end point, ``(len(timesteps) + 1,)``, float64.

    Flow schedulers give ``t / (1 - t)``, which is ``inf`` at ``t = 1``. Schedulers with k-diffusion
    sigmas give those sigmas. Others give ``sqrt((1 - abar) / abar)`` from ``alphas_cumprod``, and their
    end point is ``final_alpha_cumprod`` (DDIM) or 0.
    """
    timesteps = scheduler.timesteps
    if timesteps is None:
        raise ConfigError(
            f"scheduler: expected timesteps to be set (set_timesteps), got None on {type(scheduler).__name__}"
        )
    n = len(timesteps)
    sigmas = getattr(scheduler, "sigmas", None)
    if is_flow(scheduler):
        if sigmas is not None and len(sigmas) > n:
            t = torch.as_tensor(sigmas, dtype=torch.float64).cpu()[: n + 1]
        else:
            t = torch.cat([timesteps.double().cpu() / scheduler.config.num_train_timesteps, torch.zeros(1)])
        return sigma_from_flow_t(t.double())
    if isinstance(sigmas, Tensor) and len(sigmas) > n:
        return sigmas.double().cpu()[: n + 1]
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise ConfigError(
            f"scheduler: expected sigmas or alphas_cumprod to read noise levels from, got neither on "
            f"{type(scheduler).__name__}"
        )
    acp = alphas_cumprod.double().cpu()
    steps = timesteps.long().cpu()
    # DDIM's last step goes to timestep t - T // n when that is >= 0 (trailing spacing), else to final_alpha_cumprod
    prev = int(steps[-1]) - scheduler.config.num_train_timesteps // n
    final = getattr(scheduler, "final_alpha_cumprod", torch.tensor(1.0))
    end = acp[prev] if prev >= 0 else torch.as_tensor(final, dtype=torch.float64)
    return sigma_from_alphas_cumprod(torch.cat([acp[steps], end.reshape(1)]))
