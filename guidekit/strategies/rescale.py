"""Guidance rescale: pull the guided prediction's std back towards the conditional one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..context import GuidanceContext, StrategySpace
from ..errors import ConfigError
from ..ops.checks import is_finite_number
from ..ops.guidance import rescale_std
from ..registry import STRATEGIES
from .base import Combinator, GuidanceStrategy, Predictions
from .cfg import CFG

__all__ = ["Rescale"]


_DEFAULT_INNER = CFG(7.5)  # frozen, so one shared default instance is safe


@STRATEGIES.register("rescale")
@dataclass(frozen=True)
class Rescale(Combinator):
    """Guidance rescale around any strategy (Lin, Liu, Li & Yang, WACV 2024, arXiv 2305.08891, §3.4).

    ``ĝ = inner(c, u)``, then per sample ``out = φ · ĝ · std(c)/std(ĝ) + (1 - φ) · ĝ``
    (:func:`guidekit.ops.guidance.rescale_std`; diffusers' ``rescale_noise_cfg`` / ``guidance_rescale``).
    It fixes the over-exposure of high CFG scales, most of all with zero-terminal-SNR schedules.

    Rescaling is not linear, so the prediction space matters. The paper rescales v-predictions and
    diffusers rescales whatever the model outputs; so ``space`` is the inner strategy's space, except that
    a linear inner strategy (``space == "any"``, e.g. CFG) makes it ``"native"``: the model's own output,
    as in diffusers.

    Args:
        inner: the strategy whose output is rescaled (default ``CFG(7.5)``).
        phi: ``φ`` in ``[0, 1]``; 0 gives ``inner`` unchanged, 1 matches ``std(c)`` exactly. 0.7 is the
            paper's recommendation (diffusers' own default, 0.0, turns it off).
    """

    inner: GuidanceStrategy = _DEFAULT_INNER
    phi: float = 0.7

    def __post_init__(self) -> None:
        if not isinstance(self.inner, GuidanceStrategy):
            raise ConfigError(f"inner: expected a GuidanceStrategy, got {type(self.inner).__name__}")
        phi = self.phi
        if not is_finite_number(phi) or not 0 <= phi <= 1:
            raise ConfigError(f"phi: expected a number in [0, 1], got {phi!r}")

    @property  # type: ignore[override]
    def space(self) -> StrategySpace:  # type: ignore[override]
        return "native" if self.inner.space == "any" else self.inner.space

    def combine_branches(self, preds: Predictions, ctx: GuidanceContext, state: Any) -> tuple[Tensor, Any]:
        guided, state = self.inner.combine_branches(preds, ctx, state)
        pred_cond = preds.get("cond")
        if self.phi == 0.0 or pred_cond is None or guided is pred_cond:
            return guided, state
        return rescale_std(guided, pred_cond, self.phi), state
