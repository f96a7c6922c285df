"""TV-CFG: the stage-wise triangular guidance schedule (Jin, Shi & Gu, ICLR 2026, arXiv 2509.22007)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..context import GuidanceContext
from ..errors import ConfigError
from ..ops.checks import check_choice
from ..ops.schedules import tvcfg_scales
from ..ops.spaces import flow_t_from_sigma
from ..registry import STRATEGIES
from .base import GuidanceStrategy
from .cfg import CFG
from .scheduled import ScheduledScale

__all__ = ["TVCFG"]


@STRATEGIES.register("tv-cfg")
@dataclass(frozen=True)
class TVCFG(ScheduledScale):
    """Low guidance early and late, high in the middle, with the time-averaged scale of ``inner`` (methods.md §9.1).

    The paper's three stages: strong early guidance erodes diversity (direction shift), strong late
    guidance suppresses fine variation (concentration), the middle (mode separation) is where it pays.
    Official schedule (sqt24/tvcfg ``guidance_schedulers.py``, ``symmetric``): a triangle from 1 up to
    ``2w̄ - 1`` at step ``⌊N/2⌋`` and back, rescaled so that ``Σ w_i Δt_i = w̄`` with ``w̄ = inner.scale``
    (:func:`guidekit.ops.schedules.tvcfg_scales`). Works over any inner strategy with a ``scale``
    (the paper also runs it with APG).

    Args:
        inner: the strategy run at each step's scale; its ``scale`` is the mean ``w̄`` (default ``CFG(7.5)``).
        time: the time ``Δt_i`` is measured in. ``"flow"`` (official, SD3): ``t = σ/(1+σ)`` of the run's
            sigmas, normalised by ``t_0`` (needs ``ctx.sigmas``); ``"steps"``: uniform, ``Δt_i = 1/N``.
    """

    inner: GuidanceStrategy = CFG(7.5)  # noqa: RUF009 - frozen, so a shared default is safe
    time: Literal["flow", "steps"] = "flow"

    def __post_init__(self) -> None:
        self._check_inner()
        check_choice("time", self.time, ("flow", "steps"))

    @classmethod
    def contract_example(cls) -> TVCFG:
        """The shared contract's contexts carry no sigma schedule: use uniform time."""
        return cls(time="steps")

    def scales(self, ctx: GuidanceContext) -> Tensor:
        """The whole schedule ``(num_steps,)`` float64 for the run ``ctx`` belongs to."""
        n = ctx.num_steps
        if self.time == "steps":
            return tvcfg_scales(self.mean_scale, torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64))
        if ctx.sigmas is None or ctx.sigmas.numel() != n + 1:
            got = None if ctx.sigmas is None else tuple(ctx.sigmas.shape)
            raise ConfigError(
                f"ctx.sigmas: expected the run's sigma schedule of num_steps + 1 = {n + 1} values for "
                f"time='flow', got {got} (the guided loop passes it; or use time='steps')"
            )
        return tvcfg_scales(self.mean_scale, flow_t_from_sigma(ctx.sigmas.detach().to("cpu", torch.float64)))

    def scale_at(self, ctx: GuidanceContext) -> Tensor:
        table = self.scales(ctx)
        if not 0 <= ctx.step < table.numel():
            raise ConfigError(f"ctx.step: expected 0 <= step < num_steps = {table.numel()}, got {ctx.step}")
        return table[ctx.step].expand(ctx.sigma.shape[0])
