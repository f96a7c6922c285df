"""Samplers, schedules and model adapters. Samplers are plain functions over a denoiser.

Every sampler has the signature ``sample_x(denoiser, x, sigmas, *, generator=None, callback=None, **options)``
and is registered in :data:`guidekit.registry.SAMPLERS`: ``ddim``, ``euler``, ``euler-ancestral``, ``heun``,
``dpmpp-2m``, ``flow-euler``. Plugins add more through the ``guidekit.samplers`` entry-point group.
"""

from __future__ import annotations

from ..ops.timesteps import flow_sigmas, flow_times, karras_sigmas, vp_sigmas
from ..registry import SAMPLERS
from .adapters import EDMModel, FlowModel, ModelAdapter, VPModel, adapt
from .base import Callback, Denoised, Denoiser, SamplerStep, StepInfo, check_sigmas, evaluate, randn_like
from .ddim import sample_ddim
from .dpmpp_2m import sample_dpmpp_2m
from .euler import sample_euler
from .euler_ancestral import sample_euler_ancestral
from .flow_euler import sample_flow_euler
from .heun import sample_heun

__all__ = [
    "Callback",
    "Denoised",
    "Denoiser",
    "EDMModel",
    "FlowModel",
    "ModelAdapter",
    "SamplerStep",
    "StepInfo",
    "VPModel",
    "adapt",
    "check_sigmas",
    "evaluate",
    "flow_sigmas",
    "flow_times",
    "get",
    "karras_sigmas",
    "names",
    "randn_like",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_flow_euler",
    "sample_heun",
    "vp_sigmas",
]


def names(pattern: str | None = None) -> list[str]:
    """Registered sampler names (built-ins and plugins), optionally glob-filtered."""
    return SAMPLERS.names(pattern)


def get(name: str):
    """The sampler function registered as ``name`` (an unknown name lists the known ones)."""
    return SAMPLERS.get(name)
