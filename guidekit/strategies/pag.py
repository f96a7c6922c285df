"""PAG: perturbed-attention guidance (Ahn et al., ECCV 2024, arXiv 2403.17377; methods.md §9.8)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..branch import Branch, Plan, merge_plans
from ..context import GuidanceContext
from ..errors import ConfigError
from ..ops.checks import check_number
from ..perturbations import IdentitySelfAttention
from ..registry import STRATEGIES
from .base import Combinator, GuidanceStrategy, Predictions
from .cfg import CFG

__all__ = ["PAG"]


@STRATEGIES.register("pag")
@dataclass(frozen=True)
class PAG(Combinator):
    """``inner(c, u) + s · (c − p)``: guide away from a forward whose self-attention maps are the identity.

    ``p`` is the conditional prediction of the same network with the self-attention of the selected layers
    replaced by the identity (each token attends to itself: :class:`~guidekit.perturbations.IdentitySelfAttention`),
    a degraded prediction that lacks the structure attention builds. With ``inner = CFG(w)`` this is
    diffusers' PAG pipelines' ``u + w (c − u) + s (c − p)`` (``pag_scale = s``, ``pag_applied_layers =
    layers``; their adaptive scale 0); ``inner = CFG(1)`` is PAG without classifier-free guidance (2 NFE).
    The plan is the inner one plus ``Branch("perturbed", condition="cond", perturbation=...)``: 3 NFE a
    step with CFG, and the perturbed forward runs separately (a different network). Linear in the
    predictions, so any space. ``s = 0`` plans no perturbed branch and equals ``inner``.

    Args:
        inner: the guidance between ``c`` and ``u`` (default ``CFG(7.5)``).
        scale: ``s`` (the SD/SDXL PAG pipelines use 3.0).
        layers: layer selectors of the self-attention to perturb (default ``("mid",)``, the SD/SDXL choice).
    """

    inner: GuidanceStrategy = CFG(7.5)  # noqa: RUF009 - frozen, so a shared default is safe
    scale: float = 3.0
    layers: tuple[str, ...] = ("mid",)

    def __post_init__(self) -> None:
        if not isinstance(self.inner, GuidanceStrategy):
            raise ConfigError(f"inner: expected a GuidanceStrategy, got {type(self.inner).__name__}")
        check_number("scale", self.scale)
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))  # from a JSON spec
        if not self.layers or not all(isinstance(x, str) and x for x in self.layers):
            raise ConfigError(f"layers: expected one or more layer selectors (strings), got {self.layers!r}")

    @property
    def perturbed(self) -> Branch:
        """The perturbed branch: the conditional forward with identity self-attention in ``layers``."""
        return Branch("perturbed", condition="cond", perturbation=IdentitySelfAttention(self.layers))

    def branches(self, ctx: GuidanceContext, state: Any) -> Plan:
        plan = self.inner.branches(ctx, state)
        return plan if self.scale == 0 else merge_plans(plan, (self.perturbed,))

    def combine_branches(self, preds: Predictions, ctx: GuidanceContext, state: Any) -> tuple[Tensor, Any]:
        guided, state = self.inner.combine_branches(preds, ctx, state)
        if self.scale == 0 or "perturbed" not in preds:
            return guided, state
        return guided + self.scale * (preds["cond"] - preds["perturbed"]), state
