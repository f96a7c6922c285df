"""Limited-interval guidance: guide only inside a band of noise levels."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..branch import COND, Plan, merge_plans
from ..context import GuidanceContext
from ..errors import ConfigError, ShapeError
from ..ops.checks import is_finite_number, is_number
from ..ops.shapes import append_dims, per_sample_full
from ..registry import STRATEGIES
from .base import Combinator, GuidanceStrategy, Predictions
from .cfg import CFG

__all__ = ["Interval"]


_DEFAULT_INNER = CFG(2.0)  # frozen, so one shared default instance is safe


@STRATEGIES.register("interval")
@dataclass(frozen=True)
class Interval(Combinator):
    """Apply ``inner`` only for ``sigma_lo < sigma <= sigma_hi`` (Kynkäänniemi et al., NeurIPS 2024, arXiv 2404.07724).

    Outside the interval the result is ``pred_cond`` itself (bit-identical) and :meth:`needs_uncond` is
    False, so the loop skips the unconditional forward: one NFE per step instead of two. The test is per
    sample on the EDM sigma of the context (``ctx.sigma``); a batch mixing samples inside and outside is
    guided elementwise. Flow models: ``t = sigma / (1 + sigma)``, see :meth:`from_flow_times`.

    **One decision per step.** In a sampling loop the test reads ``ctx.step_sigma``, the step's schedule
    value in float64: the predictor, the corrector (Heun) and a churned ``sigma_hat`` (``s_churn > 0``)
    follow the same decision, and a float32 run guides the same steps as a float64 one.

    **State.** ``inner``'s state passes through. It advances only on evaluations where ``inner`` runs, and
    per sample: a sample outside the interval keeps its state (tensors in the state whose first dim is the
    batch), so an APG momentum buffer only accumulates the steps that were actually guided.

    Args:
        inner: the strategy applied inside (default ``CFG(2.0)``, the paper's EDM2-XXL FID setting).
        sigma_lo: exclusive lower bound, EDM sigma (default 0.28).
        sigma_hi: inclusive upper bound, EDM sigma, ``None`` for no bound (default 5.42, the paper's
            SD-XL / EDM2-S interval). A flow schedule's first step, ``t = 1``, is ``sigma = inf``.
    """

    inner: GuidanceStrategy = _DEFAULT_INNER
    sigma_lo: float = 0.28
    sigma_hi: float | None = 5.42

    def __post_init__(self) -> None:
        if not isinstance(self.inner, GuidanceStrategy):
            raise ConfigError(f"inner: expected a GuidanceStrategy, got {type(self.inner).__name__}")
        lo, hi = self.sigma_lo, self.sigma_hi
        if not is_finite_number(lo) or lo < 0:
            raise ConfigError(f"sigma_lo: expected a finite number >= 0, got {lo!r}")
        if hi is not None and (not is_finite_number(hi) or hi < lo):
            raise ConfigError(
                f"sigma_hi: expected a finite number >= sigma_lo ({lo!r}), or None for no bound, got {hi!r}"
            )

    # -- construction helpers --------------------------------------------------------------------
    @classmethod
    def from_fractions(
        cls, inner: GuidanceStrategy, start: float, stop: float, sigmas: Tensor | Sequence[float]
    ) -> Interval:
        """The interval that guides the steps ``int(start·N) <= i < int(stop·N)`` of a given schedule.

        That is diffusers' ``start``/``stop`` rule (fractions of the step count). ``sigmas`` is the
        schedule's ``N + 1`` EDM sigmas, strictly decreasing, ending with the final one (usually 0), as in
        ``ctx.sigmas``; step ``i`` evaluates at ``sigmas[i]``. The bounds are schedule values:
        ``sigma_hi = sigmas[i0]`` (included) and ``sigma_lo = sigmas[i1]`` (excluded), so on this schedule
        exactly those steps are guided. Unlike the fractions, the stored sigmas keep their meaning when
        the step count or the sampler changes.
        """
        for name, value in (("start", start), ("stop", stop)):
            if not is_number(value) or not 0 <= value <= 1:
                raise ConfigError(f"{name}: expected a fraction in [0, 1], got {value!r}")
        if stop < start:
            raise ConfigError(f"stop: expected a fraction >= start ({start!r}), got {stop!r}")
        schedule = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
        if schedule.ndim != 1 or schedule.numel() < 2:
            raise ConfigError(f"sigmas: expected a 1D schedule of N + 1 >= 2 values, got shape {tuple(schedule.shape)}")
        if (
            bool(torch.isnan(schedule).any())
            or bool((schedule < 0).any())
            or bool((schedule[1:] >= schedule[:-1]).any())
        ):
            raise ConfigError(f"sigmas: expected strictly decreasing values >= 0, got {schedule.tolist()}")
        num_steps = schedule.numel() - 1
        first, end = int(start * num_steps), int(stop * num_steps)
        if end <= first:  # nothing guided: an empty interval (lo == hi)
            bound = float(schedule[first]) if math.isfinite(schedule[first]) else float(schedule[first + 1])
            return cls(inner, sigma_lo=bound, sigma_hi=bound)
        return cls(inner, sigma_lo=float(schedule[end]), sigma_hi=_finite_or_none(float(schedule[first])))

    @classmethod
    def from_flow_times(cls, inner: GuidanceStrategy, t_lo: float, t_hi: float) -> Interval:
        """Bounds in rectified-flow time ``t`` (guide iff ``t_lo < t <= t_hi``), via ``sigma = t / (1 - t)``.

        The map is increasing, so the rule is the same in both units; ``t_hi = 1`` (``sigma = inf``) gives
        ``sigma_hi = None``, no upper bound.
        """
        for name, value in (("t_lo", t_lo), ("t_hi", t_hi)):
            if not is_number(value) or not 0 <= value <= 1:
                raise ConfigError(f"{name}: expected a flow time in [0, 1], got {value!r}")
        if t_lo == 1.0:
            raise ConfigError(f"t_lo: expected a flow time < 1 (sigma_lo must be finite), got {t_lo!r}")
        return cls(inner, sigma_lo=t_lo / (1.0 - t_lo), sigma_hi=None if t_hi == 1.0 else t_hi / (1.0 - t_hi))

    @property
    def flow_times(self) -> tuple[float, float]:
        """The bounds as rectified-flow times, ``t = sigma / (1 + sigma)``."""
        hi = 1.0 if self.sigma_hi is None else self.sigma_hi / (1.0 + self.sigma_hi)
        return self.sigma_lo / (1.0 + self.sigma_lo), hi

    # -- the rule --------------------------------------------------------------------------------
    def inside(self, ctx: GuidanceContext) -> Tensor:
        """``(b,)`` bool: which samples of this evaluation are guided.

        When the caller knows the schedule, the test reads ``ctx.step_sigma``: the step's schedule value in
        float64, the same for the predictor, the corrector and a churned ``sigma_hat``, and the same in a
        float32 and a float64 run (comparing a float32-rounded sigma would move the window's edges:
        ``from_fractions`` bounds are schedule values). Without it, a corrector tests its step's
        ``ctx.sigmas[ctx.step]`` and any other evaluation ``ctx.sigma`` per sample.
        """
        if ctx.step_sigma is not None:
            sigma = torch.full(ctx.sigma.shape, float(ctx.step_sigma), dtype=torch.float64)
        elif ctx.substep > 0 and ctx.sigmas is not None and 0 <= ctx.step < ctx.sigmas.shape[0]:
            sigma = torch.full(ctx.sigma.shape, float(ctx.sigmas[ctx.step]), dtype=torch.float64)
        else:
            sigma = ctx.sigma.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if bool(torch.isnan(sigma).any()):
            raise ConfigError("ctx.sigma: expected a noise level, got NaN (the window cannot place it)")
        inside = sigma > self.sigma_lo
        return inside if self.sigma_hi is None else inside & (sigma <= self.sigma_hi)

    def needs_uncond(self, ctx: GuidanceContext) -> bool:
        return bool(self.inside(ctx).any()) and self.inner.needs_uncond(ctx)

    def branches(self, ctx: GuidanceContext, state: Any) -> Plan:
        """Inside: the inner plan; outside: ``(COND,)``; a batch with both: their union."""
        inside = self.inside(ctx)
        if not bool(inside.any()):
            return (COND,)
        plan = self.inner.branches(ctx, state)
        return plan if bool(inside.all()) else merge_plans((COND,), plan)

    def combine_branches(self, preds: Predictions, ctx: GuidanceContext, state: Any) -> tuple[Tensor, Any]:
        inside = self.inside(ctx)
        if "cond" in preds:
            self._mask(inside, preds["cond"])
        if not bool(inside.any()):
            return preds["cond"], state
        guided, new_state = self.inner.combine_branches(preds, ctx, state)
        if bool(inside.all()):
            return guided, new_state
        cond = preds["cond"]
        return torch.where(self._mask(inside, cond), guided, cond), _merge_state(inside, new_state, state)

    def renoise_prediction(self, preds: Predictions, ctx: GuidanceContext, state: Any = None) -> Tensor | None:
        """Inside: the inner strategy's re-noise direction (CFG++'s ``u``); outside: ``pred_cond``'s own."""
        inside = self.inside(ctx)
        direction = self.inner.renoise_prediction(preds, ctx, state) if bool(inside.any()) else None
        if direction is None or bool(inside.all()):
            return direction
        cond = preds["cond"]
        return torch.where(self._mask(inside, cond), direction, cond)

    def scale_map(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor | None:
        inside = self.inside(ctx)
        ones = per_sample_full(pred_cond, 1.0)
        if not bool(inside.any()):
            return ones
        inner = self.inner.scale_map(pred_cond, pred_uncond, ctx)
        if inner is None or bool(inside.all()):
            return inner
        return torch.where(self._mask(inside, pred_cond), inner, ones)

    @staticmethod
    def _mask(inside: Tensor, like: Tensor) -> Tensor:
        if inside.shape[0] != like.shape[0]:
            raise ShapeError(f"ctx.sigma: expected {like.shape[0]} values (one per sample), got {inside.shape[0]}")
        return append_dims(inside.to(like.device), like.ndim)


def _merge_state(inside: Tensor, new: Any, old: Any) -> Any:
    """Per sample: samples ``inside`` take ``new``, the others keep ``old``.

    Tensors whose first dim is the batch are merged with ``torch.where``; tuples, lists, dicts and
    dataclasses are merged field by field; any other value (a step counter) takes ``new``.
    """
    if isinstance(new, Tensor) and isinstance(old, Tensor):
        if new.shape == old.shape and new.ndim >= 1 and new.shape[0] == inside.shape[0]:
            return torch.where(append_dims(inside.to(new.device), new.ndim), new, old)
        return new
    if dataclasses.is_dataclass(new) and not isinstance(new, type) and type(new) is type(old):
        fields = [f for f in dataclasses.fields(new) if f.init]
        merged = {f.name: _merge_state(inside, getattr(new, f.name), getattr(old, f.name)) for f in fields}
        return dataclasses.replace(new, **merged)
    if isinstance(new, tuple | list) and type(new) is type(old) and len(new) == len(old):
        items = [_merge_state(inside, n, o) for n, o in zip(new, old, strict=True)]
        return new._make(items) if hasattr(new, "_make") else type(new)(items)
    if isinstance(new, dict) and isinstance(old, dict) and new.keys() == old.keys():
        return {k: _merge_state(inside, new[k], old[k]) for k in new}
    return new


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
