"""DPS: diffusion posterior sampling, loss guidance through the denoiser (Chung et al., ICLR 2023, arXiv 2209.14687)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..branch import Plan
from ..context import GuidanceContext, StrategySpace
from ..errors import ConfigError
from ..losses import Loss, check_loss_value, sample_norm
from ..ops.checks import check_number
from ..ops.shapes import per_sample
from ..ops.spaces import vp_alpha
from ..registry import STRATEGIES
from .base import GuidanceStrategy, Predictions
from .cfg import CFG

__all__ = ["DPS"]


@STRATEGIES.register("dps")
@dataclass(frozen=True)
class DPS(GuidanceStrategy):
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

    space: ClassVar[StrategySpace] = "x0"
    contract_exempt: ClassVar[dict[str, str]] = {
        "spec_round_trip": "holds a loss with data (a measurement, a mask, a classifier), built in code",
    }

    inner: GuidanceStrategy = CFG(1.0)  # noqa: RUF009 - frozen, so a shared default is safe
    loss: Loss | None = None
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.inner, GuidanceStrategy):
            raise ConfigError(f"inner: expected a GuidanceStrategy, got {type(self.inner).__name__}")
        if self.inner.space not in ("any", "x0"):
            raise ConfigError(
                f"inner: expected a strategy in 'any' or 'x0' space (DPS works on x0 predictions), got "
                f"{type(self.inner).__name__} in {self.inner.space!r}"
            )
        if self.inner.sampler_coupled:
            raise ConfigError(
                f"inner: expected a strategy that is not sampler-coupled, got {type(self.inner).__name__}"
            )
        if self.loss is not None and not callable(self.loss):
            raise ConfigError(f"loss: expected a callable loss(x0, ctx) -> (b,), got {type(self.loss).__name__}")
        check_number("scale", self.scale, low=0.0)

    @classmethod
    def contract_example(cls) -> DPS:
        """With a data-free loss (``‖x0‖``), so that the contract can run the plan through the engine."""
        return cls(loss=sample_norm, scale=0.5)

    # -- the plan: the inner one, with a graph on a step's first evaluation ---------------------------
    def guides(self, ctx: GuidanceContext) -> bool:
        """Whether this evaluation applies the loss correction (a step's first evaluation, scale > 0)."""
        return ctx.substep == 0 and self.scale != 0.0

    def branches(self, ctx: GuidanceContext, state: Any) -> Plan:
        plan = self.inner.branches(ctx, state)
        if not self.guides(ctx):
            return plan
        if self.loss is None:
            raise ConfigError("loss: expected a loss(x0, ctx) -> (b,) to guide with (guidekit.losses), got None")
        return tuple(dataclasses.replace(b, grad=True) for b in plan)

    def models(self) -> frozenset[str]:
        return self.inner.models()

    @property
    def sampler_coupled(self) -> bool:
        return True

    def init_state(self, like: Tensor) -> Any:
        return self.inner.init_state(like)

    # -- the combine ---------------------------------------------------------------------------------
    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        return self.combine_step(pred_cond, pred_uncond, ctx, self.init_state(pred_cond))[0]

    def combine_step(
        self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext, state: Any
    ) -> tuple[Tensor, Any]:
        return self.combine_branches({"cond": pred_cond, "uncond": pred_uncond}, ctx, state)

    def combine_branches(self, preds: Predictions, ctx: GuidanceContext, state: Any) -> tuple[Tensor, Any]:
        x0, state = self.inner.combine_branches(preds, ctx, state)
        x = ctx.x
        if not self.guides(ctx) or x is None or not x.requires_grad or not x0.requires_grad:
            return x0, state  # no graph (a direct call, a corrector): the inner strategy's result
        assert self.loss is not None
        value = check_loss_value(self.loss(x0, ctx), x0.shape[0])
        (grad,) = torch.autograd.grad(value.sum(), x, retain_graph=True)
        return x0 + self.correction(grad, ctx).to(x0.dtype), state

    def correction(self, grad: Tensor, ctx: GuidanceContext) -> Tensor:
        """``−ζ ∇_x L / (α_t α_{t-1})``: the paper's VP step ``−ζ ∇_{x_vp} L`` in EDM coordinates."""
        sigma = ctx.sigma.to(torch.float64)
        nxt = ctx.sigma_next.to(device=sigma.device, dtype=torch.float64) if ctx.sigma_next is not None else sigma
        alphas = vp_alpha(sigma) * vp_alpha(nxt)
        k = torch.where(alphas > 0, -self.scale / alphas.clamp(min=1e-300), torch.zeros_like(alphas))  # sigma = inf
        return per_sample(k, grad) * grad

    def renoise_prediction(self, preds: Predictions, ctx: GuidanceContext, state: Any = None) -> Tensor:
        """The inner strategy's x0, before the correction: the noise direction the sampler steps along."""
        start = state if state is not None else self.init_state(preds["cond"])
        return self.inner.combine_branches(preds, ctx, start)[0]
