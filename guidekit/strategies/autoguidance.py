"""AutoGuidance: guide with a weaker model instead of the unconditional branch (Karras et al., NeurIPS 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..registry import STRATEGIES
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
    The combine is CFG's (this subclass changes only the default and the branch): pass ``weak_model=``
    to :func:`guidekit.sample` / :func:`guidekit.guided` (and no ``uncond``: the weak model then sees
    ``cond``). The loop refuses to run this strategy without a weak model, since the unconditional branch
    would silently turn it into CFG.

    Args:
        scale: guidance weight ``w`` (the paper's ImageNet settings lie between about 2 and 3; ``w = 1`` is the
            main model alone).
    """

    scale: float = 2.0

    requires_weak_model: ClassVar[bool] = True
    """Read by the guided loop: the second branch must come from ``weak_model``."""
