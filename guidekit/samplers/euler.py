"""Euler sampler for the probability-flow ODE in EDM coordinates."""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import SAMPLERS
from .base import Callback, Denoiser, Generator, StepInfo, check_sigmas, evaluate, report

__all__ = ["sample_euler"]


@SAMPLERS.register("euler")
def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generator = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler steps of ``dx/dsigma = (x - D(x; sigma)) / sigma`` (Karras et al. 2022, Algorithm 2 without the
    second-order correction; k-diffusion ``sample_euler`` with ``s_churn = 0``). Deterministic.

    Args:
        denoiser: ``D(x, sigma, info) -> x0`` in EDM coordinates.
        x: the starting sample ``x0 + sigmas[0] · noise``, ``(b, c, *spatial)`` (at ``sigmas[0] = inf``: the noise).
        sigmas: EDM schedule, decreasing, ending at 0.
        generator: unused (deterministic); accepted so every sampler has one signature.
        callback: called with a :class:`~guidekit.samplers.base.SamplerStep` after every step.
    """
    sigmas = check_sigmas(sigmas, x)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        # Evaluate dx/dsigma at sigma_i.
        x, denoised, d = evaluate(denoiser, x, sigma, StepInfo(i, n, sigmas))
        # Euler step. At sigma = inf, x holds x / sigma and the step is its limit denoised + sigma_next · d.
        x = denoised + sigma_next * d if torch.isinf(sigma) else x + (sigma_next - sigma) * d
        report(callback, i, sigmas, x, denoised)
    return x
