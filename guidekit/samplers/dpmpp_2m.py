"""DPM-Solver++(2M) (Lu et al. 2022), multistep second order in log-SNR time."""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import SAMPLERS
from .base import Callback, Denoiser, Generator, StepInfo, check_sigmas, evaluate, report

__all__ = ["sample_dpmpp_2m"]


@SAMPLERS.register("dpmpp-2m")
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generator = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2; k-diffusion ``sample_dpmpp_2m``). Deterministic.

    With ``t = -log sigma`` and ``h = t_next - t``: ``x' = (sigma'/sigma) x - expm1(-h) D``, where ``D``
    extrapolates the last two denoised values with ``r = h_last / h``. The first step, the last step (to 0)
    and a step from sigma = inf are first order (the first-order update is DDIM). With a sampler-coupled
    denoiser the history holds the x0 of its noise direction (CFG++'s unconditional one).
    """
    sigmas = check_sigmas(sigmas, x)
    n = len(sigmas) - 1
    old_denoised: Tensor | None = None
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_in = x
        x, denoised, d = evaluate(denoiser, x, sigma, StepInfo(i, n, sigmas))
        if torch.isinf(sigma):
            # First-order step from the limit (x holds x / sigma).
            x = denoised + sigma_next * d
        else:
            t, t_next = -sigma.log(), -sigma_next.log()
            h = t_next - t
            if old_denoised is None or sigma_next == 0:
                denoised_d = denoised
            else:
                # Second-order multistep correction from the previous denoised value.
                r = (t - (-sigmas[i - 1].log())) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - torch.expm1(-h) * denoised_d
        # The history is the x0 the step's noise direction implies: ``denoised`` itself, or, for a
        # sampler-coupled denoiser (CFG++: ``Denoised(x0_λ, eps_u)``), ``x - sigma·eps_u = D_u`` (official
        # CFG++ DPM-Solver++(2M); ComfyUI's dpmpp_2m_cfg_pp).
        coupled = x is not x_in and bool(torch.isfinite(sigma))
        old_denoised = x_in - sigma * d if coupled else denoised
        report(callback, i, sigmas, x, denoised)
    return x
