"""Euler sampler of the rectified-flow ODE, in flow coordinates."""

from __future__ import annotations

from torch import Tensor

from ..ops.spaces import edm_x_from, flow_t_from_sigma, flow_x
from ..registry import SAMPLERS
from .base import Callback, Denoiser, Generator, StepInfo, check_sigmas, evaluate, report

__all__ = ["sample_flow_euler"]


@SAMPLERS.register("flow-euler")
def sample_flow_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generator = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler steps of ``dx_t/dt = v`` with ``v = eps - x0`` and ``x_t = (1 - t) x0 + t eps`` (Liu et al. 2023;
    diffusers ``FlowMatchEulerDiscreteScheduler.step``): ``x_t' = x_t + (t' - t) · v``, ``t = sigma / (1 + sigma)``.

    Takes and returns EDM coordinates like every sampler (``x = x_t / (1 - t)``); the step itself is taken
    on ``x_t``. Deterministic.
    """
    sigmas = check_sigmas(sigmas, x)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, denoised, eps = evaluate(denoiser, x, sigma, StepInfo(i, n, sigmas))
        # Velocity and the flow-time step.
        v = eps - denoised
        t, t_next = flow_t_from_sigma(sigma), flow_t_from_sigma(sigma_next)
        x_t = flow_x(x, sigma) + (t_next - t) * v
        x = edm_x_from(x_t, sigma_next, "flow")
        report(callback, i, sigmas, x, denoised)
    return x
