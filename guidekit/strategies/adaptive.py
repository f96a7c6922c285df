"""Adaptive Guidance (Castillo et al., AAAI 2025, arXiv 2312.12487; methods.md §9.5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..branch import COND, UNCOND, FollowUp, Plan, merge_plans
from ..context import GuidanceContext, StrategySpace
from ..errors import ConfigError
from ..ops.checks import check_number
from ..ops.guidance import per_sample_cosine
from ..ops.shapes import append_dims
from ..registry import STRATEGIES
from .base import GuidanceStrategy, Predictions
from .cfg import CFG

__all__ = ["AdaptiveGuidance"]

State = tuple[Tensor, Any]
"""``(switched, inner_state)``: a ``(b,)`` bool flag per sample and the inner strategy's own state."""


@STRATEGIES.register("adaptive-guidance")
@dataclass(frozen=True)
class AdaptiveGuidance(GuidanceStrategy):
    """Guide until the two predictions agree, then use the conditional one alone (saves the uncond NFE).

    Late in sampling the CFG update aligns with the conditional prediction, so AG stops guiding a sample
    from the first step where ``γ = cos(c, u) > threshold`` (per sample, over all non-batch dims, float64)
    and never guides it again: the flag is monotone and lives in the explicit state, advanced on
    ``substep == 0`` only; the engine hands a Heun corrector the state its step's first evaluation
    returned, so both evaluations of the switching step follow that step's decision (the corrector of a
    sample that switched uses ``c`` and, once all have, runs no unconditional branch). Before the switch the output is
    ``inner``'s; from the switching step on it is ``c``. Once every sample has switched,
    :meth:`needs_uncond_state` is False and the loop stops calling the unconditional branch.
    Rule after asagi4/ComfyUI-Adaptive-Guidance, the one implementation read (it tests ``>=`` on the whole
    batch and still guides on the switching step; we switch per sample on ``γ > γ̄`` and from that step).

    **Space.** The cosine is taken between the *x0* predictions (as in ComfyUI) when ``inner`` is linear
    (``space == "any"``) or an x0 strategy, otherwise in ``inner``'s space. Between eps predictions it is
    useless as a switch: at high noise both predict the input's noise, so it starts at 1 and *falls*
    (digits UNet, DDIM 20, CFG 3: eps cosine 1.000 → 0.994, x0 cosine 0.85 → 1.000, monotone).

    Args:
        inner: the guidance used before the switch (default ``CFG(7.5)``).
        threshold: ``γ̄``; 0.99 (ComfyUI's default; the paper's 0.991 is quoted for a 20-step LDM).
            ``γ̄ >= 1`` never switches (plain ``inner``); ``γ̄ < -1`` is conditional from step 0.
    """

    inner: GuidanceStrategy = CFG(7.5)  # noqa: RUF009 - frozen, so a shared default is safe
    threshold: float = 0.99

    def __post_init__(self) -> None:
        if not isinstance(self.inner, GuidanceStrategy):
            raise ConfigError(f"inner: expected a GuidanceStrategy, got {type(self.inner).__name__}")
        if self.inner.sampler_coupled:
            raise ConfigError(
                f"inner: expected a prediction-combining strategy, got the sampler-coupled {type(self.inner).__name__} "
                "(its re-noising cannot follow AG's per-sample switch)"
            )
        check_number("threshold", self.threshold)

    @property  # type: ignore[override]
    def space(self) -> StrategySpace:  # type: ignore[override]
        return "x0" if self.inner.space == "any" else self.inner.space

    def init_state(self, like: Tensor) -> State:
        return torch.zeros(like.shape[0], dtype=torch.bool, device=like.device), self.inner.init_state(like)

    def needs_uncond(self, ctx: GuidanceContext) -> bool:
        return self.inner.needs_uncond(ctx)

    def needs_uncond_state(self, ctx: GuidanceContext, state: State) -> bool:
        return any(b.name == "uncond" for b in self.branches(ctx, state))

    def branches(self, ctx: GuidanceContext, state: State) -> Plan:
        """``(COND,)`` once every sample has switched; before, the inner plan (with ``uncond`` for the
        cosine on a step's first evaluation). A corrector is handed its step's decision in the state."""
        switched, inner_state = state
        if bool(switched.all()) or not self.inner.needs_uncond_state(ctx, inner_state):
            return (COND,)
        plan = self.inner.branches(ctx, inner_state)
        return merge_plans((COND, UNCOND), plan) if ctx.substep == 0 else merge_plans((COND,), plan)

    def models(self) -> frozenset[str]:
        return self.inner.models()

    def perturbations(self) -> frozenset[str]:
        return self.inner.perturbations()

    def observers(self) -> frozenset[str]:
        return self.inner.observers()

    @property
    def follows_up(self) -> bool:
        return self.inner.follows_up

    def follow_up(self, preds: Predictions, ctx: GuidanceContext, state: State) -> FollowUp | None:
        return self.inner.follow_up(preds, ctx, state[1])

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        return self.combine_step(pred_cond, pred_uncond, ctx, self.init_state(pred_cond))[0]

    def combine_branches(self, preds: Predictions, ctx: GuidanceContext, state: State) -> tuple[Tensor, State]:
        switched, inner_state = state
        pred_cond = preds["cond"]
        if ctx.substep == 0 and not bool(switched.all()) and "uncond" in preds:
            gamma = per_sample_cosine(pred_cond, preds["uncond"])
            switched = switched | (gamma > self.threshold).to(switched.device)
        if bool(switched.all()) or len(preds) == 1:
            return pred_cond, (switched, inner_state)
        guided, new_inner = self.inner.combine_branches(preds, ctx, inner_state)
        if bool(switched.any()):
            guided = torch.where(append_dims(switched, guided.ndim), pred_cond, guided)
        return guided, (switched, new_inner)
