"""SLG: skip-layer guidance (Stability AI's SD 3.5; the block-skipping of STG-R, Hyung et al., CVPR 2025)."""

from __future__ import annotations

from dataclasses import dataclass

from ..perturbations import SkipBlocks
from ..registry import STRATEGIES
from .base import GuidanceStrategy
from .cfg import CFG
from .perturbed import PerturbedGuidance

__all__ = ["SLG"]


@STRATEGIES.register("slg")
@dataclass(frozen=True)
class SLG(PerturbedGuidance):
    """``inner(c, u) + s · (c − p)``, with ``p`` the conditional prediction with whole blocks skipped.

    The selected blocks return their inputs (:class:`~guidekit.perturbations.SkipBlocks`). With
    ``inner = CFG(w)`` this is the SD3 pipeline's ``skip_guidance_layers`` rule, ``u + w (c − u) + s (c − p)``
    (``skip_layer_guidance_scale = s``); its window (guide only for ``start·N < i < stop·N``, default 0.01 and
    0.2, both strict, so 4 steps with (0.25, 0.75) guide step 2 only) is a noise-level window here:
    ``gk.Interval(gk.SLG(...), sigma_lo, sigma_hi)`` or ``Interval.from_fractions(SLG(...), 0.01, 0.2, sigmas)``,
    which keeps ``int(start·N) <= i < int(stop·N)``.

    Args:
        inner: the guidance between ``c`` and ``u`` (default ``CFG(7.0)``, SD 3.5's).
        scale: ``s`` (SD 3.5 uses 2.8).
        layers: block names or dotted suffixes (default SD 3.5-Medium's ``transformer_blocks.7``, ``.8``, ``.9``).
    """

    inner: GuidanceStrategy = CFG(7.0)  # noqa: RUF009 - frozen, so a shared default is safe
    scale: float = 2.8
    layers: tuple[str, ...] = ("transformer_blocks.7", "transformer_blocks.8", "transformer_blocks.9")

    def perturbation(self) -> SkipBlocks:
        return SkipBlocks(self.layers)
