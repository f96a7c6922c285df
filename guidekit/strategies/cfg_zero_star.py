"""CFG-Zero*: optimised-scale CFG with zero-init (Fan, Zheng, Yeh & Liu, arXiv 2503.18886; methods.md §9.3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..context import GuidanceContext
from ..energy.base import check_number
from ..errors import ConfigError
from ..functional_extra import cfg_zero_star
from ..registry import STRATEGIES
from .base import GuidanceStrategy

__all__ = ["CFGZeroStar"]


@STRATEGIES.register("cfg-zero-star")
@dataclass(frozen=True)
class CFGZeroStar(GuidanceStrategy):
    """``s*·u + w (c - s*·u)`` with ``s* = ⟨c, u⟩ / ‖u‖²`` per sample, and the first steps zeroed.

    ``s*`` is the least-squares scale of ``u`` towards ``c`` (paper eq. 8), which corrects the
    unconditional velocity of an under-trained flow model; on the first ``zero_init_steps`` steps the
    output is zero ("zero-init": the sample does not move), and the guided loop skips the network there
    (:meth:`skips_model`). Official rule (WeichenFan/CFG-Zero-star pipelines), on the model's raw output
    (velocity for flow models, eps for UNets). diffusers 0.42.1's ``ClassifierFreeZeroStarGuidance``
    computes the same rule (tested equal); its first version (commit 05d74ef3) shifted by the unscaled
    ``u``, ``s*·u + w (c - u)``, kept here as ``scaled_shift=False``.

    Zero output means zero in the native space (``v = 0``, ``eps = 0``); for an x0 (EDM denoiser) model it
    is ``x0 = x``, the same "no move" (needs ``ctx.x``).

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

    def skips_model(self, ctx: GuidanceContext) -> bool:
        """True on zero-init steps: the output does not read the predictions (the loop's hook)."""
        return ctx.step < self.zero_init_steps

    def needs_uncond(self, ctx: GuidanceContext) -> bool:
        return self.scale != 1.0 and not self.skips_model(ctx)

    def zero_prediction(self, like: Tensor, ctx: GuidanceContext) -> Tensor:
        """The "no move" prediction in ``ctx.space``: zeros, or ``ctx.x`` for x0 predictions."""
        if ctx.space != "x0":
            return torch.zeros_like(like)
        if ctx.x is None:
            raise ConfigError("ctx.x: expected the current sample for a zero-init step on x0 predictions, got None")
        return ctx.x.to(like.dtype).expand_as(like).clone()

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        if self.skips_model(ctx):
            return self.zero_prediction(pred_cond, ctx)
        if self.scale == 1.0:
            return pred_cond
        return cfg_zero_star(pred_cond, pred_uncond, self.scale, self.scaled_shift)
