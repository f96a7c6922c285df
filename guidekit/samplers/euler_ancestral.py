"""Euler ancestral sampler (k-diffusion)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from ..registry import SAMPLERS
from .base import Callback, Denoiser, Generator, StepInfo, check_sigmas, evaluate, randn_like, report

__all__ = ["ancestral_step", "sample_euler_ancestral"]


def ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Split a step ``sigma -> sigma_next`` into ``(sigma_down, sigma_up)`` with ``down^2 + up^2 = next^2``.

    ``sigma_up = min(sigma_next, eta · sigma_next · sqrt(1 - sigma_next^2 / sigma^2))`` (k-diffusion
    ``get_ancestral_step``; the DDPM posterior when ``eta = 1``); finite at ``sigma = inf``.
    """
    up = torch.minimum(sigma_next, eta * sigma_next * torch.sqrt(1 - (sigma_next / sigma) ** 2))
    return torch.sqrt(sigma_next**2 - up**2), up


@SAMPLERS.register("euler-ancestral")
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: Generator = None,
    callback: Callback | None = None,
) -> Tensor:
    """Ancestral sampling with Euler steps: a deterministic Euler step to ``sigma_down``, then fresh noise of
    std ``sigma_up`` (k-diffusion ``sample_euler_ancestral``; ``eta = 0`` is plain Euler).
    """
    if not float(eta) >= 0.0:
        raise ConfigError(f"eta: expected a number >= 0, got {eta!r}")
    sigmas = check_sigmas(sigmas, x)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, denoised, d = evaluate(denoiser, x, sigma, StepInfo(i, n, sigmas))
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        # Euler step to sigma_down (its limit from sigma = inf).
        x = denoised + sigma_down * d if torch.isinf(sigma) else x + (sigma_down - sigma) * d
        # Add the noise that brings the sample back up to sigma_next.
        if sigma_next > 0 and sigma_up > 0:
            x = x + randn_like(x, generator) * (s_noise * sigma_up)
        report(callback, i, sigmas, x, denoised)
    return x
