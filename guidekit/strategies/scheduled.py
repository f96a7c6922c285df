"""The shared mechanics of the schedule combinators: run an inner strategy at a per-step scale."""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor

from ..branch import Plan, merge_plans
from ..context import GuidanceContext
from ..errors import ConfigError
from .base import Combinator, GuidanceStrategy, Predictions

__all__ = ["ScheduledScale", "slice_context"]


def slice_context(ctx: GuidanceContext, index: Tensor) -> GuidanceContext:
    """``ctx`` restricted to the samples ``index`` (per-sample fields: ``sigma``, ``sigma_next``, ``x``)."""
    b = ctx.sigma.shape[0]

    def take(v: Tensor | None) -> Tensor | None:
        return v[index] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == b else v

    return ctx.replace(sigma=ctx.sigma[index], sigma_next=take(ctx.sigma_next), x=take(ctx.x))


class ScheduledScale(Combinator):
    """Base of the schedule combinators: ``inner`` with its ``scale`` replaced by :meth:`scale_at`.

    Subclasses are frozen dataclasses with an ``inner`` field (any strategy with a ``scale`` parameter:
    CFG, APG, TCFG, ADG, CFG-Zero*, ...) and implement :meth:`scale_at`. A scale of 1 lets the loop skip
    the unconditional forward when the inner strategy allows it. Samples whose scales differ (a schedule
    over per-sample sigma) run in groups, which needs a stateless inner strategy.
    """

    inner: GuidanceStrategy

    @abstractmethod
    def scale_at(self, ctx: GuidanceContext) -> Tensor:
        """The scale of each sample at this evaluation, ``(b,)`` float64."""

    # -- helpers for subclasses ------------------------------------------------------------------
    def _check_inner(self) -> None:
        if not isinstance(self.inner, GuidanceStrategy):
            raise ConfigError(f"inner: expected a GuidanceStrategy, got {type(self.inner).__name__}")
        names = {f.name for f in dataclasses.fields(self.inner)} if dataclasses.is_dataclass(self.inner) else set()
        if "scale" not in names:
            raise ConfigError(
                "inner: expected a strategy with a `scale` parameter (CFG, APG, TCFG, ADG, CFGZeroStar, ...), "
                f"got {type(self.inner).__name__}"
            )

    @property
    def mean_scale(self) -> float:
        """The inner strategy's own scale (the schedule's target mean where it has one)."""
        return float(self.inner.scale)  # type: ignore[attr-defined]

    def _at(self, scale: float) -> GuidanceStrategy:
        return dataclasses.replace(self.inner, scale=scale)  # type: ignore[type-var]

    def _groups(self, ctx: GuidanceContext) -> list[tuple[Tensor | None, GuidanceStrategy, GuidanceContext]]:
        scales = self.scale_at(ctx)
        values = torch.unique(scales)
        if values.numel() == 1:
            return [(None, self._at(float(values[0])), ctx)]
        groups = []
        for v in values:
            index = torch.nonzero(scales == v).flatten().to(ctx.sigma.device)
            groups.append((index, self._at(float(v)), slice_context(ctx, index)))
        return groups

    # -- the strategy ----------------------------------------------------------------------------
    def needs_uncond(self, ctx: GuidanceContext) -> bool:
        return any(s.needs_uncond(c) for _, s, c in self._groups(ctx))

    def branches(self, ctx: GuidanceContext, state: Any) -> Plan:
        return merge_plans(*(s.branches(c, state) for _, s, c in self._groups(ctx)))

    def combine_branches(self, preds: Predictions, ctx: GuidanceContext, state: Any) -> tuple[Tensor, Any]:
        groups = self._groups(ctx)
        if len(groups) == 1:
            return groups[0][1].combine_branches(preds, ctx, state)
        if state is not None:
            raise ConfigError(
                f"inner: expected a stateless strategy when samples get different scales, got "
                f"{type(self.inner).__name__} with state (give every sample the same sigma)"
            )
        out: Tensor | None = None
        for index, strategy, sub in groups:
            part, _ = strategy.combine_branches({k: v[index] for k, v in preds.items()}, sub, None)
            if out is None:
                out = part.new_empty((ctx.sigma.shape[0], *part.shape[1:]))
            out[index] = part
        assert out is not None
        return out, state

    def scale_map(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor | None:
        groups = self._groups(ctx)
        if len(groups) == 1:
            return groups[0][1].scale_map(pred_cond, pred_uncond, ctx)
        maps = [(i, s.scale_map(pred_cond[i], pred_uncond[i], sub)) for i, s, sub in groups]
        if any(m is None for _, m in maps):
            return None
        first = maps[0][1]
        assert first is not None
        out = first.new_empty((pred_cond.shape[0], *first.shape[1:]))
        for index, m in maps:
            out[index] = m
        return out
