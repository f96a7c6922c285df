"""DPS: diffusion posterior sampling, loss guidance through the denoiser (Chung et al., ICLR 2023, arXiv 2209.14687)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..context import GuidanceContext
from ..ops.checks import check_number
from ..ops.shapes import per_sample
from ..ops.spaces import vp_alpha
from ..registry import STRATEGIES
from .loss_guidance import LossGuidance

__all__ = ["DPS"]


@STRATEGIES.register("dps")
@dataclass(frozen=True)
class DPS(LossGuidance):
    """Move each step against the gradient of a loss on the predicted clean sample (DPS, Algorithm 1).

    With ``x̂0(x_t)`` the guided x0 of ``inner`` and ``L`` the loss (``‖y − A(x̂0)‖`` for an inverse
    problem), in VP coordinates as the paper writes it::

        x'_{t-1} = the sampler's step from x̂0
        x_{t-1}  = x'_{t-1} − ζ · ∇_{x_t} L(x̂0(x_t))

    ``∇_{x_t}`` goes through the network: the plan's branches carry ``grad=True`` and the engine keeps their
    graph back to the noisy sample. In EDM coordinates (``x = x_vp / α``) the correction of ``x_{t-1}`` is
    ``−ζ ∇_x L / (α_t α_{t-1})``. It is applied through the step hook: the sampler steps from
    ``x̂0 − ζ ∇_x L / (α_t α_{t-1})`` along the *uncorrected* noise direction, so for every first-order
    sampler (DDIM with any eta, Euler, Euler ancestral, flow Euler) the step is exactly the sampler's own
    step shifted by the correction, and DPM-Solver++(2M) keeps the uncorrected x0 in its history. A Heun
    corrector evaluation applies no correction (it plans no gradient).

    The official code's ``scale`` is ``ζ`` with ``L = ‖y − A(x̂0)‖`` (the norm, so ``ζ_i = ζ'/‖r‖`` of the
    squared form); it takes one norm over the whole batch, we take it per sample (batch elements stay
    independent). Its defaults: ``ζ = 1.0`` for inpainting and super-resolution on FFHQ, 0.3-0.4 for
    deblurring. Outside the engine (a direct call) there is no graph, and DPS returns ``inner``'s result.

    Args:
        inner: the guidance of the conditional part (default ``CFG(1.0)``: the conditional model alone).
        loss: ``loss(x0, ctx) -> (b,)`` (see :mod:`guidekit.losses`); required to sample.
        scale: ``ζ``, the step size.
    """

    scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("scale", self.scale, low=0.0)

    def active(self, ctx: GuidanceContext) -> bool:
        return self.scale != 0.0

    def step_x0(self, x0: Tensor, ctx: GuidanceContext) -> Tensor:
        return x0 + self.correction(self.gradient(x0, ctx), ctx)

    def correction(self, grad: Tensor, ctx: GuidanceContext) -> Tensor:
        """``−ζ ∇_x L / (α_t α_{t-1})``: the paper's VP step ``−ζ ∇_{x_vp} L`` in EDM coordinates."""
        sigma = ctx.sigma.to(torch.float64)
        nxt = ctx.sigma_next.to(device=sigma.device, dtype=torch.float64) if ctx.sigma_next is not None else sigma
        alphas = vp_alpha(sigma) * vp_alpha(nxt)
        k = torch.where(alphas > 0, -self.scale / alphas.clamp(min=1e-300), torch.zeros_like(alphas))  # sigma = inf
        return per_sample(k, grad) * grad
