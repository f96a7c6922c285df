"""DSG: guidance with a spherical Gaussian constraint (Yang et al., ICML 2024, arXiv 2402.03201; methods.md §9.7)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..context import GuidanceContext
from ..errors import ConfigError
from ..ops.checks import check_number
from ..ops.shapes import per_sample
from ..ops.spaces import vp_alpha
from ..registry import STRATEGIES
from .loss_guidance import LossGuidance

__all__ = ["DSG"]


@STRATEGIES.register("dsg")
@dataclass(frozen=True)
class DSG(LossGuidance):
    """Steer each stochastic step's noise towards the loss gradient, on the sphere the noise lives on.

    Official rule (LingxiaoYang2023/DSG2024 ``condition_methods.py`` class ``DSG`` @86bc9875), per sample,
    in VP coordinates, after the DDIM step's mean ``μ`` and noise ``σ_t z`` (eta-DDIM, ``σ_t`` its eq. 16)::

        g      = ∇_{x_t} L(x̂0(x_t))                           (through the network)
        r      = sqrt(n) · σ_t                                  (n = elements per sample)
        d*     = −r · g / ‖g‖
        d_samp = σ_t z
        d_m    = d_samp + g_r · (d* − d_samp)
        x_{t-1} = μ + r · d_m / ‖d_m‖

    Large steps stay on the sphere ``‖x_{t-1} − μ‖ = r`` where the Gaussian step's mass is, so far fewer
    steps than DPS are needed (the paper). ``interval``: guide every ``interval``-th step (the other steps
    are the plain eta-DDIM step).

    **The stochastic step is DSG's own.** The sampler must not add noise: use a deterministic first-order
    sampler (``ddim`` with ``eta=0``, ``euler``, ``flow-euler``). DSG draws ``z`` from a generator seeded by
    ``(seed, step)``, builds ``x_{t-1}`` and hands it to the sampler through the step hook (the sampler steps
    from ``x_{t-1} − σ' ε̂`` along ``ε̂``, which lands exactly on ``x_{t-1}``). ``eta = 1`` is DDPM's
    variance (default); at ``σ_t = 0`` (the last step) the step is deterministic and unguided. Outside the
    engine (a direct call, no graph) DSG is its inner strategy.

    Args:
        inner: the guidance of the conditional part (default ``CFG(1.0)``).
        loss: ``loss(x0, ctx) -> (b,)`` (see :mod:`guidekit.losses`); required to sample.
        guidance_rate: ``g_r`` in ``[0, 1]`` (official default 0.2); 0 is the plain eta-DDIM step.
        interval: guide every ``interval``-th step (official default 1).
        eta: the DDIM eta of DSG's stochastic step, in ``(0, 1]``.
        seed: the seed of DSG's noise (one stream per step).
    """

    guidance_rate: float = 0.2
    interval: int = 1
    eta: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("guidance_rate", self.guidance_rate, low=0.0, high=1.0)
        check_number("eta", self.eta, low=1e-12, high=1.0)
        for name in ("interval", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "interval" else 0):
                raise ConfigError(f"{name}: expected an integer >= {1 if name == 'interval' else 0}, got {value!r}")

    def guided_step(self, ctx: GuidanceContext) -> bool:
        """Whether this step is a guided one (every ``interval``-th, guidance_rate > 0)."""
        return self.guidance_rate > 0 and ctx.step % self.interval == 0

    def step_x0(self, x0: Tensor, ctx: GuidanceContext) -> Tensor:
        x = ctx.x
        assert x is not None
        if ctx.sigma_next is None:
            raise ConfigError("ctx.sigma_next: expected the next noise level (DSG takes the stochastic step itself)")
        sigma = ctx.sigma.to(torch.float64)
        nxt = ctx.sigma_next.to(device=sigma.device, dtype=torch.float64)
        if not bool(torch.isfinite(sigma).all()):
            return x0  # a flow schedule's first step (t = 1): the deterministic limit
        a, a_next = vp_alpha(sigma) ** 2, vp_alpha(nxt) ** 2
        s_t = self.eta * torch.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))  # (b,), VP
        eps = ((x - x0) / per_sample(sigma, x)).detach()
        x0_d = x0.detach()
        mean = per_sample(a_next.sqrt(), x) * x0_d + per_sample(torch.sqrt((1 - a_next - s_t**2).clamp(min=0)), x) * eps
        z = torch.randn(
            x.shape, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.step), dtype=torch.float64
        )
        d_samp = per_sample(s_t, x) * z.to(device=x.device, dtype=x.dtype)
        if self.guided_step(ctx) and bool((s_t > 0).all()):
            grad = self.gradient(x0, ctx) / per_sample(vp_alpha(sigma), x)  # ∇_{x_vp} = ∇_x / α
            r = math.sqrt(x[0].numel()) * s_t
            d_star = -per_sample(r, x) * grad / per_sample(grad.flatten(1).norm(dim=1) + 1e-8, x)
            d_m = d_samp + self.guidance_rate * (d_star - d_samp)
            norm = d_m.flatten(1).norm(dim=1).to(torch.float64)
            # g_r = 1 with a zero gradient (a saturated loss) leaves d_m = 0: the plain step there, not NaN
            scaled = per_sample(r / norm.clamp(min=1e-300), x) * d_m
            d_samp = torch.where(per_sample(norm > 0, x, dtype=torch.bool), scaled, d_samp)
        x_next = (mean + d_samp) / per_sample(vp_alpha(nxt), x)  # VP -> EDM at sigma'
        return (x_next - per_sample(nxt, x) * eps).detach()
