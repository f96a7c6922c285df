"""PAG: perturbed-attention guidance (Ahn et al., ECCV 2024, arXiv 2403.17377; methods.md §9.8)."""

from __future__ import annotations

from dataclasses import dataclass

from ..perturbations import IdentitySelfAttention
from ..registry import STRATEGIES
from .base import GuidanceStrategy
from .cfg import CFG
from .perturbed import PerturbedGuidance

__all__ = ["PAG"]


@STRATEGIES.register("pag")
@dataclass(frozen=True)
class PAG(PerturbedGuidance):
    """``inner(c, u) + s · (c − p)``: guide away from a forward whose self-attention maps are the identity.

    ``p`` is the conditional prediction with the self-attention of the selected layers replaced by the
    identity (each token attends to itself: :class:`~guidekit.perturbations.IdentitySelfAttention`), a
    degraded prediction that lacks the structure attention builds. With ``inner = CFG(w)`` this is diffusers'
    PAG pipelines' ``u + w (c − u) + s (c − p)`` (``pag_scale = s``, ``pag_applied_layers = layers``; their
    adaptive scale 0); ``inner = CFG(1)`` is PAG without classifier-free guidance (2 NFE a step, 3 with CFG).

    Args:
        inner: the guidance between ``c`` and ``u`` (default ``CFG(7.5)``).
        scale: ``s`` (the SD/SDXL PAG pipelines use 3.0).
        layers: self-attention selectors (regular expressions; default ``("mid",)``, the SD/SDXL choice).
    """

    inner: GuidanceStrategy = CFG(7.5)  # noqa: RUF009 - frozen, so a shared default is safe
    scale: float = 3.0
    layers: tuple[str, ...] = ("mid",)

    def perturbation(self) -> IdentitySelfAttention:
        return IdentitySelfAttention(self.layers)
