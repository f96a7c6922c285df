"""NAG: normalized attention guidance (Chen, Bandyopadhyay, Zou & Song 2025, arXiv 2505.21179)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..branch import Branch, Plan
from ..context import GuidanceContext
from ..errors import ConfigError
from ..perturbations import NormalizedAttention
from ..registry import STRATEGIES
from .base import Combinator, GuidanceStrategy, Predictions
from .cfg import CFG

__all__ = ["NAG"]


@STRATEGIES.register("nag")
@dataclass(frozen=True)
class NAG(Combinator):
    """Negative guidance in attention space: the ``cond`` forward runs with its cross-attention outputs

    ``Ẑ = α · normalise(φ Z⁺ − (φ − 1) Z⁻) + (1 − α) Z⁺``,   ``normalise(z̃) = z̃ · min(1, τ ‖Z⁺‖₁ / ‖z̃‖₁)``

    per token, where ``Z⁺`` attends to the branch's context and ``Z⁻`` (same queries) to the ``negative``
    condition's context (:class:`~guidekit.perturbations.NormalizedAttention`). ``φ = 1 + s`` in the
    notation ``Z⁺ + s (Z⁺ − Z⁻)``. It needs no extra branch: with ``inner = CFG(1)`` (distilled models, the
    method's purpose) the plan is one ``cond`` forward whose batch carries the negative context's rows
    (2 rows a sample, one forward); with ``inner = CFG(w)`` the ``uncond`` branch is the plain forward, as in
    the official pipelines. The combine is the inner strategy's.

    Defaults follow the official code (ChenDarYen/Normalized-Attention-Guidance): ``nag_scale`` φ = 5 (the
    Flux example; SDXL's is 3, Wan's 9), ``nag_tau`` τ = 2.5, ``nag_alpha`` α = 0.25 (the Flux pipeline),
    every cross-attention layer; the L1 norm of the paper (the first Flux release used L2).

    Args:
        inner: the guidance between ``c`` and ``u`` (default ``CFG(1.0)``: the conditional forward only).
        scale: φ, ``nag_scale`` (1 is no guidance).
        tau: τ, the cap on ``‖z̃‖₁ / ‖Z⁺‖₁``.
        alpha: α in ``[0, 1]``, the blend with ``Z⁺``.
        layers: cross-attention selectors (regular expressions); ``()`` is every cross-attention layer.
        negative: the condition whose context is ``Z⁻`` (``"uncond"``: the negative prompt or null label
            the caller passes as ``uncond``; another name is an extra condition).
    """

    inner: GuidanceStrategy = CFG(1.0)  # noqa: RUF009 - frozen, so a shared default is safe
    scale: float = 5.0
    tau: float = 2.5
    alpha: float = 0.25
    layers: tuple[str, ...] = ()
    negative: str = "uncond"

    def __post_init__(self) -> None:
        if not isinstance(self.inner, GuidanceStrategy):
            raise ConfigError(f"inner: expected a GuidanceStrategy, got {type(self.inner).__name__}")
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))  # from a JSON spec
        object.__setattr__(self, "_guided", Branch("cond", perturbation=self.perturbation()))  # checks the rest

    def perturbation(self) -> NormalizedAttention:
        """The change to the ``cond`` forward."""
        return NormalizedAttention(self.layers, self.scale, self.tau, self.alpha, self.negative)

    def perturbations(self) -> frozenset[str]:
        return self.inner.perturbations() | {NormalizedAttention.kind}

    def branches(self, ctx: GuidanceContext, state: Any) -> Plan:
        plan = self.inner.branches(ctx, state)
        if self.scale == 1.0:
            return plan
        guided: Branch = self._guided  # type: ignore[attr-defined]
        return tuple(guided if b.name == "cond" and b.perturbation is None else b for b in plan)

    def combine_branches(self, preds: Predictions, ctx: GuidanceContext, state: Any) -> tuple[Tensor, Any]:
        return self.inner.combine_branches(preds, ctx, state)
