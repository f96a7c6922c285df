"""The strategy interface every guidance method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ..component import Component
from ..context import GuidanceContext, StrategySpace
from ..ops.checks import check_finite, check_pair
from ..registry import STRATEGIES

__all__ = ["Combinator", "GuidanceStrategy", "nested_strategies", "sampler_coupled"]


class GuidanceStrategy(Component, ABC):
    """Combine a conditional and an unconditional prediction into a guided one.

    Tensors are ``(b, c, *spatial)`` of any rank (4D images, 5D video in ``(b, c, f, h, w)``); see
    :mod:`guidekit.layout` for other layouts. Built-in strategies are frozen dataclasses whose fields are
    their parameters, so they are immutable, comparable and serialisable with :func:`guidekit.to_spec`.

    Contract (checked for every registered name by :mod:`guidekit.testing`):

    * the output has the input's shape, dtype and device; batch elements are independent;
    * ``pred_cond == pred_uncond`` gives ``pred_cond``;
    * state lives only in what :meth:`init_state` / :meth:`step` pass around, and advances once per
      sampler step (``ctx.substep == 0``), never on a corrector evaluation.

    Subclasses implement :meth:`combine` (stateless) or override :meth:`combine_step` (stateful).
    """

    registry: ClassVar = STRATEGIES
    space: ClassVar[StrategySpace] = "any"
    """The prediction space the math is defined in; the guided loop converts into it and back."""

    # -- what the loop asks before the forward pass ----------------------------------------------
    def needs_uncond(self, ctx: GuidanceContext) -> bool:
        """Whether this evaluation needs the unconditional prediction (False saves one NFE)."""
        return True

    def needs_uncond_state(self, ctx: GuidanceContext, state: Any) -> bool:
        """Like :meth:`needs_uncond`, for strategies whose answer depends on their state (AG)."""
        return self.needs_uncond(ctx)

    # -- state ----------------------------------------------------------------------------------
    def init_state(self, like: Tensor) -> Any:
        """The state at the start of a run, for predictions shaped like ``like``; ``None`` if stateless."""
        return None

    # -- the combine ----------------------------------------------------------------------------
    @abstractmethod
    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        """The guided prediction, without input checks. Stateful strategies use a fresh state here."""

    def combine_step(
        self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext, state: Any
    ) -> tuple[Tensor, Any]:
        """One step with explicit state; stateless strategies need not override it."""
        return self.combine(pred_cond, pred_uncond, ctx), state

    def step(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext, state: Any) -> tuple[Tensor, Any]:
        """Checked combine with explicit state: returns ``(guided, new_state)``."""
        check_pair(pred_cond, pred_uncond)
        out, state = self.combine_step(pred_cond, pred_uncond, ctx, state)
        if not ctx.allow_nonfinite:
            _check_output(out, pred_cond, pred_uncond)
        return out, state

    def __call__(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext | None = None) -> Tensor:
        """Stateless, checked call: ``step`` from a fresh state. ``ctx`` defaults to sigma = 1, step 0 of 1."""
        if ctx is None:
            check_pair(pred_cond, pred_uncond)
            ctx = GuidanceContext.default(pred_cond)
        out, _ = self.step(pred_cond, pred_uncond, ctx, self.init_state(pred_cond))
        return out

    # -- introspection --------------------------------------------------------------------------
    def scale_map(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor | None:
        """The effective guidance scale this strategy applies, broadcastable to the predictions.

        ``None`` when the strategy is not of the form ``u + Ω ⊙ (c - u)``. Spatial strategies (SAMG)
        return a ``(b, 1, *spatial)`` map; the guided loop records it when asked to.
        """
        return None


class Combinator(GuidanceStrategy):
    """A strategy around an ``inner`` one (Interval, Rescale, schedules).

    Space, state, ``needs_uncond`` and the loop hooks (CFG++'s ``renoise_prediction``, CFG-Zero*'s
    ``skips_model``) delegate to ``inner``; subclasses declare the ``inner`` dataclass field, implement
    :meth:`combine_step` and override only what they change.
    """

    if TYPE_CHECKING:
        inner: GuidanceStrategy

    @property  # type: ignore[override]
    def space(self) -> StrategySpace:  # type: ignore[override]
        return self.inner.space

    def needs_uncond(self, ctx: GuidanceContext) -> bool:
        return self.inner.needs_uncond(ctx)

    def needs_uncond_state(self, ctx: GuidanceContext, state: Any) -> bool:
        return self.inner.needs_uncond_state(ctx, state)

    def init_state(self, like: Tensor) -> Any:
        return self.inner.init_state(like)

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        return self.combine_step(pred_cond, pred_uncond, ctx, self.init_state(pred_cond))[0]

    @abstractmethod
    def combine_step(
        self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext, state: Any
    ) -> tuple[Tensor, Any]: ...

    def skips_model(self, ctx: GuidanceContext) -> bool:
        hook = getattr(self.inner, "skips_model", None)
        return hook is not None and bool(hook(ctx))

    def renoise_prediction(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor | None:
        hook = getattr(self.inner, "renoise_prediction", None)
        return None if hook is None else hook(pred_cond, pred_uncond, ctx)


def _check_output(out: Tensor, pred_cond: Tensor, pred_uncond: Tensor) -> None:
    """Non-finite output: name the input that caused it (inputs are read only on the error path).

    One float reduction is the fast test: any NaN/Inf makes the sum non-finite. A finite tensor whose sum
    overflows falls through to the exact element-wise check, so the test has no false alarms.
    """
    if bool(torch.isfinite(out.sum(dtype=torch.float32))) or bool(torch.isfinite(out).all()):
        return
    check_finite(pred_cond, "pred_cond")
    check_finite(pred_uncond, "pred_uncond")
    check_finite(out, "guided output")


def nested_strategies(strategy: object) -> list[GuidanceStrategy]:
    """The strategies a combinator holds in its attributes (``Interval.inner``, ...); ``[]`` for a leaf."""
    values = vars(strategy).values() if hasattr(strategy, "__dict__") else ()
    return [v for v in values if isinstance(v, GuidanceStrategy)]


def sampler_coupled(strategy: GuidanceStrategy) -> bool:
    """Whether ``strategy`` re-noises along its own direction (CFG++), itself or through its combinators.

    A combinator is coupled when a strategy it wraps is; it then has to forward ``renoise_prediction``.
    """
    children = nested_strategies(strategy)
    if children:
        return any(sampler_coupled(child) for child in children)
    return callable(getattr(strategy, "renoise_prediction", None))
