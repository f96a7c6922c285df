"""The shared rule of perturbation guidance (PAG, SLG, ...): ``inner(c, u) + s · (c − p)``, with ``p`` the
conditional prediction of a perturbed forward of the same network."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..branch import Branch, Perturbation, Plan, merge_plans
from ..context import GuidanceContext
from ..errors import ConfigError
from ..ops.checks import check_number
from .base import Combinator, GuidanceStrategy, Predictions

__all__ = ["PerturbedGuidance"]


@dataclass(frozen=True)
class PerturbedGuidance(Combinator):
    """Base of the perturbation strategies: the inner plan plus ``Branch("perturbed", condition="cond",
    perturbation=self.perturbation())``, combined as ``inner(c, u) + scale · (c − p)``.

    Subclasses declare the dataclass fields ``inner``, ``scale`` and ``layers`` (with their defaults) and
    :meth:`perturbation`. Linear in the predictions, so any space; ``scale = 0`` plans no perturbed branch
    and equals ``inner``. The perturbed forward runs on its own (a different network): one NFE more a step.
    """

    if TYPE_CHECKING:
        inner: GuidanceStrategy
        scale: float
        layers: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.inner, GuidanceStrategy):
            raise ConfigError(f"inner: expected a GuidanceStrategy, got {type(self.inner).__name__}")
        check_number("scale", self.scale)
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))  # from a JSON spec
        if not self.layers or not all(isinstance(x, str) and x for x in self.layers):
            raise ConfigError(f"layers: expected one or more layer selectors (strings), got {self.layers!r}")

    @abstractmethod
    def perturbation(self) -> Perturbation:
        """What the perturbed forward changes in the network."""

    def perturbations(self) -> frozenset[str]:
        return self.inner.perturbations() | {self.perturbation().kind}

    @property
    def perturbed(self) -> Branch:
        """The perturbed branch: the conditional forward with :meth:`perturbation` applied."""
        return Branch("perturbed", condition="cond", perturbation=self.perturbation())

    def branches(self, ctx: GuidanceContext, state: Any) -> Plan:
        plan = self.inner.branches(ctx, state)
        return plan if self.scale == 0 else merge_plans(plan, (self.perturbed,))

    def combine_branches(self, preds: Predictions, ctx: GuidanceContext, state: Any) -> tuple[Tensor, Any]:
        guided, state = self.inner.combine_branches(preds, ctx, state)
        if self.scale == 0 or "perturbed" not in preds:
            return guided, state
        return guided + self.scale * (preds["cond"] - preds["perturbed"]), state
