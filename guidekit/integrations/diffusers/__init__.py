"""Run diffusers pipelines with guidekit strategies and samplers, and adapt guiders both ways.

This package is the only part of guidekit that imports diffusers. Importing :mod:`guidekit` never does.

How :func:`generate` works. It calls the pipeline itself: the pipeline encodes the prompts (the negative
prompt is the unconditional branch), prepares the latents, runs its scheduler and decodes with its VAE.
While the call runs, the denoiser's ``forward`` is intercepted. The pipeline is told to run CFG, so it
passes the denoiser the ``[uncond; cond]`` batch. Wan is different: it makes a cond call and then an
uncond call, and the two are merged into one ``[cond; uncond]`` forward. For each evaluation the
interceptor does four things:

1. It builds a :class:`~guidekit.GuidanceContext`: EDM sigma from the scheduler, step, space and ``x``.
2. It asks the strategy whether the unconditional half is needed. If so it runs one batched forward;
   if not, it runs the conditional half only, which saves one NFE.
3. It converts the predictions into the strategy's space in the canonical ``(b, c, *spatial)`` layout,
   guides, and converts back.
4. It returns ``[g; g]``. The pipeline's own combine ``g + s·(g − g)`` then gives back ``g`` exactly.

With ``sampler=`` set to a guidekit sampler, the pipeline gets a one-step stand-in scheduler. The
whole guidekit sampling loop (:func:`guidekit.guided` over the pipeline's denoiser call) runs inside
that step, on the pipeline's noise schedule.

Modules: ``families`` (the per-family table, prediction types, noise levels), ``calls`` (one
intercepted call), ``run`` (the per-call state), ``stand_in`` (the scheduler stand-in), ``generate``,
``guiders`` (the adapters to and from ``diffusers.guiders``), and ``tiny`` (tiny in-process pipelines
for tests, docs and benchmarks).
"""

from __future__ import annotations

try:
    import diffusers as _diffusers  # noqa: F401  (the dependency check)
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("guidekit.integrations.diffusers needs diffusers: pip install 'guidekit[diffusers]'") from exc

from . import observe as _observe  # noqa: F401  (registers diffusers' Attention with the attention observer)
from . import perturb as _perturb  # noqa: F401  (registers diffusers' family with the perturbations)
from .families import FAMILIES, Family, family_of, noise_schedule, prediction_space, register_family
from .generate import generate
from .guiders import DiffusersGuidance, GuidekitGuider
from .run import GenerationInfo

__all__ = [
    "FAMILIES",
    "DiffusersGuidance",
    "Family",
    "GenerationInfo",
    "GuidekitGuider",
    "family_of",
    "generate",
    "noise_schedule",
    "prediction_space",
    "register_family",
]
