"""CFG-Zero*: optimised-scale CFG with zero-init (Fan, Zheng, Yeh & Liu, arXiv 2503.18886; methods.md §9.3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..branch import Plan
from ..context import GuidanceContext
from ..errors import ConfigError
from ..ops.checks import check_number
from ..ops.guidance import cfg_zero_star
from ..registry import STRATEGIES
from .base import GuidanceStrategy, Predictions

__all__ = ["CFGZeroStar"]


@STRATEGIES.register("cfg-zero-star")
@dataclass(frozen=True)
class CFGZeroStar(GuidanceStrategy):
    """``s*·u + w (c - s*·u)`` with ``s* = ⟨c, u⟩ / ‖u‖²`` per sample, and the first steps zeroed.

    ``s*`` is the least-squares scale of ``u`` towards ``c`` (paper eq. 8), which corrects the
    unconditional velocity of an under-trained flow model; on the first ``zero_init_steps`` steps the
    output is zero ("zero-init": the sample does not move), and the guided loop skips the network there
    (the empty plan of :meth:`branches`). Official rule (WeichenFan/CFG-Zero-star pipelines), on the model's raw output
    (velocity for flow models, eps for UNets). diffusers 0.42.1's ``ClassifierFreeZeroStarGuidance``
    computes the same rule (tested equal); its first version (commit 05d74ef3) shifted by the unscaled
    ``u``, ``s*·u + w (c - u)``, kept here as ``scaled_shift=False``.

    Zero-init is defined for flow models, the paper's setting (its title: "... for Flow Matching Models"):
    ``v = 0`` keeps the flow sample ``x_t`` where it is. On any other prediction space a zero-init step
    raises :class:`~guidekit.errors.ConfigError`: a zero ε leaves the sample at the previous, much higher
    noise level (on the digits model, DDIM 20: accuracy 0.13 instead of 1.0); use ``zero_init_steps=0``.

    Args:
        scale: guidance weight ``w``; 1 gives ``c``.
        zero_init_steps: how many leading steps output zero (diffusers' name and count; the official
            ``zero_steps = k`` is ``k + 1`` here, ``use_zero_init=False`` is 0). The authors suggest the
            first 4% of steps.
        scaled_shift: ``True`` official; ``False`` the early-diffusers variant above.
    """

    scale: float = 7.5
    zero_init_steps: int = 1
    scaled_shift: bool = True

    space = "native"

    def __post_init__(self) -> None:
        check_number("scale", self.scale)
        steps = self.zero_init_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"zero_init_steps: expected an integer >= 0, got {steps!r}")
        if not isinstance(self.scaled_shift, bool):
            raise ConfigError(f"scaled_shift: expected True or False, got {self.scaled_shift!r}")

    @classmethod
    def contract_example(cls) -> CFGZeroStar:
        """The shared contract runs at step 0; without zero-init it checks the guidance rule itself
        (a zero-init step's ``0`` breaks ``c == u -> c`` by design, methods.md §11 G5)."""
        return cls(zero_init_steps=0)

    def zero_init(self, ctx: GuidanceContext) -> bool:
        """Whether this evaluation is a zero-init step (its output reads no prediction)."""
        return ctx.step < self.zero_init_steps

    def needs_uncond(self, ctx: GuidanceContext) -> bool:
        return self.scale != 1.0 and not self.zero_init(ctx)

    def branches(self, ctx: GuidanceContext, state: Any) -> Plan:
        """The empty plan on zero-init steps (the network is not called), else CFG's."""
        return () if self.zero_init(ctx) else super().branches(ctx, state)

    def combine_branches(self, preds: Predictions, ctx: GuidanceContext, state: Any) -> tuple[Tensor, Any]:
        if self.zero_init(ctx):
            like = preds.get("cond", ctx.x)
            if like is None:
                raise ConfigError("ctx.x: expected the noisy sample on a zero-init step (no prediction to shape by)")
            return self._zero(like, ctx), state
        return super().combine_branches(preds, ctx, state)

    def _zero(self, like: Tensor, ctx: GuidanceContext) -> Tensor:
        if ctx.space != "flow":
            raise ConfigError(
                f"zero_init_steps: expected 0 for {ctx.space!r} predictions (zero-init zeroes a flow velocity, "
                f"which keeps x_t; a zero {ctx.space} would leave the sample at the old noise level), "
                f"got {self.zero_init_steps}"
            )
        return torch.zeros_like(like)  # v = 0: the flow sample does not move

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        if self.zero_init(ctx):
            return self._zero(pred_cond, ctx)
        if self.scale == 1.0:
            return pred_cond
        return cfg_zero_star(pred_cond, pred_uncond, self.scale, self.scaled_shift)
