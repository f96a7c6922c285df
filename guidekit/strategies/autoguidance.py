"""AutoGuidance: guide with a weaker model instead of the unconditional branch (Karras et al., NeurIPS 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..branch import COND, Branch, Plan
from ..context import GuidanceContext
from ..registry import STRATEGIES
from .base import Predictions
from .cfg import CFG

__all__ = ["AutoGuidance"]


@STRATEGIES.register("autoguidance")
@dataclass(frozen=True)
class AutoGuidance(CFG):
    """``D_weak + w (D - D_weak)``: extrapolate away from a deliberately worse model of the same task.

    Karras, Aittala, Kynkäänniemi, Lehtinen, Aila & Laine, "Guiding a Diffusion Model with a Bad Version
    of Itself" (NeurIPS 2024, arXiv 2406.02507, eq. 2; NVlabs/edm2 ``generate_images.py``): the guiding
    model is a smaller and/or less trained version of the main one, evaluated with the *same* condition.
    It sharpens samples like CFG without CFG's loss of variety, and works for unconditional models too.
    The combine is CFG's (this subclass changes the default and the plan): its second branch is
    ``Branch("weak", model="weak")``, evaluated with the main model's condition. Pass ``weak_model=`` to
    :func:`guidekit.sample` / :func:`guidekit.guided`; the engine refuses to run it without one.

    Args:
        scale: guidance weight ``w`` (the paper's ImageNet settings lie between about 2 and 3; ``w = 1`` is the
            main model alone).
    """

    scale: float = 2.0

    def branches(self, ctx: GuidanceContext, state: Any) -> Plan:
        return (COND, WEAK) if self.scale != 1.0 else (COND,)

    def models(self) -> frozenset[str]:
        return frozenset({"main", "weak"})

    def combine_branches(self, preds: Predictions, ctx: GuidanceContext, state: Any) -> tuple[Tensor, Any]:
        cond = preds["cond"]
        weak = preds["weak"] if "weak" in preds else preds.get("uncond", cond)  # two-branch calls: (c, weak)
        return self.combine(cond, weak, ctx), state


WEAK = Branch("weak", condition="cond", model="weak")
"""The guiding model's prediction, with the same condition as the main one (paper eq. 2)."""
