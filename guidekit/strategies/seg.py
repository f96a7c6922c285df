"""SEG: smoothed energy guidance (Hong, NeurIPS 2024, arXiv 2408.00760; methods.md §9.8)."""

from __future__ import annotations

from dataclasses import dataclass

from ..perturbations import BlurredQueries
from ..registry import STRATEGIES
from .base import GuidanceStrategy
from .cfg import CFG
from .perturbed import PerturbedGuidance

__all__ = ["SEG"]


@STRATEGIES.register("seg")
@dataclass(frozen=True)
class SEG(PerturbedGuidance):
    """``inner(c, u) + s · (c − p)``, with ``p`` the conditional prediction with blurred attention queries.

    Blurring the self-attention queries with a Gaussian of ``blur_sigma`` tokens smooths the attention
    weights, which lowers the curvature of the attention "energy" (the paper); the infinite blur (the
    official default, ``blur_sigma >= 9999``) makes every query the mean query: uniform attention. Official
    code: SusungHong/SEG-SDXL (``seg_scale = 3.0`` with CFG, mid-block self-attention). diffusers 0.42.1's
    ``SmoothedEnergyGuidance`` guider never installs its hook (it equals CFG) and, patched, swaps its finite
    and infinite branches; here the infinite blur is the mean and a finite one the Gaussian, as the paper.

    Args:
        inner: the guidance between ``c`` and ``u`` (default ``CFG(7.5)``).
        scale: ``s``, SEG's guidance scale (3.0).
        layers: self-attention selectors (default ``("mid",)``).
        blur_sigma: the query blur in tokens; ``>= 9999`` is infinite.
    """

    inner: GuidanceStrategy = CFG(7.5)  # noqa: RUF009 - frozen, so a shared default is safe
    scale: float = 3.0
    layers: tuple[str, ...] = ("mid",)
    blur_sigma: float = 9999999.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.perturbation()  # checks blur_sigma

    def perturbation(self) -> BlurredQueries:
        return BlurredQueries(self.layers, self.blur_sigma)
