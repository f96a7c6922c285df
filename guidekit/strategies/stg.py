"""STG: spatiotemporal skip guidance for video (Hyung et al., CVPR 2025, arXiv 2411.18664; methods.md §9.8)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from ..context import GuidanceContext
from ..errors import ConfigError
from ..ops.checks import check_number
from ..ops.guidance import rescale_std
from ..perturbations import IdentitySelfAttention, SkipBlocks
from ..registry import STRATEGIES
from .base import GuidanceStrategy, Predictions
from .cfg import CFG
from .perturbed import PerturbedGuidance

__all__ = ["STG"]


@STRATEGIES.register("stg")
@dataclass(frozen=True)
class STG(PerturbedGuidance):
    """``ĝ = inner(c, u) + s · (c − p)`` with ``p`` the conditional prediction with blocks skipped (STG-R),
    then rescaled: ``ĝ · (ρ · std(c)/std(ĝ) + 1 − ρ)``.

    Official code (junhahyung/STGuidance, the CogVideoX/Mochi/LTX pipelines): skip whole residual blocks of a
    video DiT in chosen layers (STG-R; CogVideoX layer 30, scale 1.0) and rescale with ``ρ = 0.7``. The
    reference pipelines take one std over the whole batch; we take it per sample (batch elements stay
    independent; equal for batch 1), which is ``Rescale(SLG(...), ρ)`` written as one strategy.

    ``mode="A"`` (STG-A) skips only the spatiotemporal attention of the selected layers: their self-attention
    map becomes the identity (:class:`~guidekit.perturbations.IdentitySelfAttention`, PAG's perturbation, over
    all video tokens of the clip; in a joint text-video layer the text keeps its attention). Its selectors are
    searched in the self-attention layers' names (``"transformer_blocks.30"`` finds ``...30.attn1``).

    Args:
        inner: the guidance between ``c`` and ``u`` (default ``CFG(6.0)``, CogVideoX's).
        scale: ``s`` (1.0).
        layers: blocks to skip (default ``("transformer_blocks.30",)``, CogVideoX-5B's STG-R layer).
        rescale: ``ρ`` in ``[0, 1]`` (0.7); 0 is SLG's rule.
        mode: ``"R"`` skips whole blocks (the default), ``"A"`` makes their self-attention the identity.
    """

    inner: GuidanceStrategy = CFG(6.0)  # noqa: RUF009 - frozen, so a shared default is safe
    scale: float = 1.0
    layers: tuple[str, ...] = ("transformer_blocks.30",)
    rescale: float = 0.7
    mode: Literal["R", "A"] = "R"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("rescale", self.rescale, low=0.0, high=1.0)
        if self.mode not in ("R", "A"):
            raise ConfigError(f"mode: expected 'R' (skip blocks) or 'A' (identity attention), got {self.mode!r}")

    def perturbation(self) -> SkipBlocks | IdentitySelfAttention:
        return SkipBlocks(self.layers) if self.mode == "R" else IdentitySelfAttention(self.layers)

    def combine_branches(self, preds: Predictions, ctx: GuidanceContext, state: Any) -> tuple[Tensor, Any]:
        guided, state = super().combine_branches(preds, ctx, state)
        if self.rescale == 0.0 or guided is preds["cond"]:
            return guided, state
        return rescale_std(guided, preds["cond"], self.rescale), state
