"""DDIM sampler, written in VP coordinates as in the paper."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from ..ops.spaces import edm_x_from, vp_alpha, vp_sigma
from ..registry import SAMPLERS
from .base import Callback, Denoiser, Generator, StepInfo, check_sigmas, evaluate, randn_like, report

__all__ = ["sample_ddim"]


@SAMPLERS.register("ddim")
def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 0.0,
    generator: Generator = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM (Song, Meng & Ermon 2021, eq. 12): ``x' = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z``.

    ``a = alphas_cumprod = 1 / (1 + sigma^2)``; ``s = eta · sqrt((1 - a') / (1 - a)) · sqrt(1 - a / a')``
    (eq. 16). ``eta = 0``: deterministic, the same update as Euler in EDM sigma and as flow Euler
    (methods.md §2); ``eta = 1``: the DDPM posterior variance. The sample is kept in EDM coordinates
    between steps (``x_vp = sqrt(a) · x``), so any EDM schedule works.
    """
    if not 0.0 <= float(eta) <= 1.0:
        raise ConfigError(f"eta: expected a number in [0, 1], got {eta!r}")
    sigmas = check_sigmas(sigmas, x)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        # Predict x0 and eps at the current point (eps is the same in VP and EDM coordinates).
        x, denoised, eps = evaluate(denoiser, x, sigma, StepInfo(i, n, sigmas))
        # Noise level of the step (eq. 16); 0 when eta = 0 and at the final step.
        a, a_next = vp_alpha(sigma) ** 2, vp_alpha(sigma_next) ** 2
        s = eta * torch.sqrt(vp_sigma(sigma_next) ** 2 / vp_sigma(sigma) ** 2 * (1 - a / a_next))
        # Eq. 12: move to the next noise level along eps, add fresh noise of variance s^2.
        x_vp = a_next.sqrt() * denoised + torch.sqrt((1 - a_next - s**2).clamp(min=0)) * eps  # clamp: rounding only
        if s > 0:
            x_vp = x_vp + s * randn_like(x, generator)
        x = edm_x_from(x_vp, sigma_next, "vp")
        report(callback, i, sigmas, x, denoised)
    return x
