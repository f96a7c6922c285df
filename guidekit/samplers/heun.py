"""Heun's second-order sampler (EDM, Algorithm 2)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..registry import SAMPLERS
from .base import Callback, Denoiser, Generator, StepInfo, check_sigmas, evaluate, randn_like, report

__all__ = ["sample_heun"]


@SAMPLERS.register("heun")
def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generator: Generator = None,
    callback: Callback | None = None,
) -> Tensor:
    """Karras et al. (2022), Algorithm 2: Euler predictor, trapezoidal corrector; 2 evaluations per step.

    The corrector evaluation gets ``info.substep = 1``. The last step (to sigma = 0) and a first step from
    sigma = inf are plain Euler steps. ``s_churn > 0`` adds EDM's stochastic churn (lines 4-6).
    """
    sigmas = check_sigmas(sigmas, x)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        # Increase noise temporarily (churn), finite sigmas only.
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax and torch.isfinite(sigma) else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + randn_like(x, generator) * (s_noise * torch.sqrt(sigma_hat**2 - sigma**2))
        # Euler step.
        x, denoised, d = evaluate(denoiser, x, sigma_hat, StepInfo(i, n, sigmas))
        if torch.isinf(sigma_hat):
            x = denoised + sigma_next * d
        elif sigma_next == 0:
            x = x + (sigma_next - sigma_hat) * d
        else:
            # Apply 2nd order correction.
            x_next = x + (sigma_next - sigma_hat) * d
            _, _, d_next = evaluate(denoiser, x_next, sigma_next, StepInfo(i, n, sigmas, substep=1))
            x = x + (sigma_next - sigma_hat) * (d + d_next) / 2
        report(callback, i, sigmas, x, denoised)
    return x
