"""The shared mechanics of loss guidance (DPS, DSG): an inner strategy's x0, a loss on it, its gradient
through the network, and a corrected step through the step hook."""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..branch import Plan
from ..context import GuidanceContext, StrategySpace
from ..errors import ConfigError
from ..losses import Loss, check_loss_value, sample_norm
from .base import Combinator, GuidanceStrategy, Predictions
from .cfg import CFG

__all__ = ["LossGuidance"]


@dataclass(frozen=True)
class LossGuidance(Combinator):
    """Base of the loss-guidance strategies: ``inner`` gives ``x̂0``, ``loss(x̂0, ctx) -> (b,)`` scores it.

    A :class:`~guidekit.strategies.base.Combinator` (models, state and the two-branch entry points are
    ``inner``'s) whose space is always x0.

    On a step's first evaluation the plan is ``inner``'s with ``grad=True``: the engine keeps the graph back
    to the noisy sample, and :meth:`gradient` is ``∇_x L(x̂0(x))`` in EDM coordinates. Subclasses return, in
    :meth:`step_x0`, the x0 the sampler steps from; the sampler steps along the noise of the uncorrected
    ``x̂0`` (the step hook, :meth:`renoise_prediction`), so a first-order sampler lands exactly where the
    subclass puts it. A corrector evaluation, or a direct call (no graph), gives ``inner``'s result.

    Losses hold data (a measurement, a mask, a classifier): strategies carrying one are built in code.
    """

    space: ClassVar[StrategySpace] = "x0"
    contract_exempt: ClassVar[dict[str, str]] = {
        "spec_round_trip": "holds a loss with data (a measurement, a mask, a classifier), built in code",
    }

    inner: GuidanceStrategy = CFG(1.0)  # noqa: RUF009 - frozen, so a shared default is safe
    loss: Loss | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.inner, GuidanceStrategy):
            raise ConfigError(f"inner: expected a GuidanceStrategy, got {type(self.inner).__name__}")
        if self.inner.space not in ("any", "x0"):
            raise ConfigError(
                f"inner: expected a strategy in 'any' or 'x0' space ({type(self).__name__} works on x0 "
                f"predictions), got {type(self.inner).__name__} in {self.inner.space!r}"
            )
        if self.inner.sampler_coupled:
            raise ConfigError(
                f"inner: expected a strategy that is not sampler-coupled, got {type(self.inner).__name__}"
            )
        if self.loss is not None and not callable(self.loss):
            raise ConfigError(f"loss: expected a callable loss(x0, ctx) -> (b,), got {type(self.loss).__name__}")

    @classmethod
    def contract_example(cls) -> LossGuidance:
        """With a data-free loss (``‖x0‖``), so that the contract can run the plan through the engine."""
        return cls(loss=sample_norm)

    # -- the plan -------------------------------------------------------------------------------------
    def active(self, ctx: GuidanceContext) -> bool:
        """Whether this step's first evaluation needs the graph (the subclass's step uses it)."""
        return True

    def branches(self, ctx: GuidanceContext, state: Any) -> Plan:
        plan = self.inner.branches(ctx, state)
        if ctx.substep > 0 or not self.active(ctx):
            return plan
        if self.loss is None:
            raise ConfigError("loss: expected a loss(x0, ctx) -> (b,) to guide with (guidekit.losses), got None")
        return tuple(dataclasses.replace(b, grad=True) for b in plan)

    @property
    def sampler_coupled(self) -> bool:
        return True

    # -- the combine (models, state and the two-branch entry points: the Combinator's delegation) -------
    def combine_branches(self, preds: Predictions, ctx: GuidanceContext, state: Any) -> tuple[Tensor, Any]:
        x0, state = self.inner.combine_branches(preds, ctx, state)
        x = ctx.x
        if ctx.substep > 0 or x is None or not x.requires_grad or not x0.requires_grad:
            return x0, state  # no graph (a direct call, a corrector): the inner strategy's result
        return self.step_x0(x0, ctx).to(x0.dtype), state

    def gradient(self, x0: Tensor, ctx: GuidanceContext) -> Tensor:
        """``∇_x L(x̂0(x))`` in EDM coordinates, through the network (the loss is checked by name)."""
        assert self.loss is not None and ctx.x is not None
        value = check_loss_value(self.loss(x0, ctx), x0.shape[0])
        (grad,) = torch.autograd.grad(value.sum(), ctx.x, retain_graph=True)
        return grad

    @abstractmethod
    def step_x0(self, x0: Tensor, ctx: GuidanceContext) -> Tensor:
        """The x0 the sampler steps from, given the inner ``x̂0`` (with its graph) on a step's first evaluation."""

    def renoise_prediction(self, preds: Predictions, ctx: GuidanceContext, state: Any = None) -> Tensor:
        """The inner strategy's x0, before the correction: the noise direction the sampler steps along."""
        start = state if state is not None else self.init_state(preds["cond"])
        with torch.no_grad():  # a direction for the sampler: no graph (the engine detaches it anyway)
            return self.inner.combine_branches(preds, ctx, start)[0]
