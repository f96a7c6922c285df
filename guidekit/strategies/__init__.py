"""Guidance strategies. Importing this package registers every built-in.

``names()`` lists registered names (plugins included); ``get(name)`` returns the class.
"""

from __future__ import annotations

from ..registry import STRATEGIES
from .adaptive import AdaptiveGuidance
from .adg import ADG
from .apg import APG
from .autoguidance import AutoGuidance
from .base import Combinator, GuidanceStrategy
from .cfg import CFG
from .cfg_zero_star import CFGZeroStar
from .cfgpp import CFGPlusPlus
from .dps import DPS
from .dsg import DSG
from .dynamic_cfg import DynamicCFG
from .fdg import FDG
from .interval import Interval
from .learned_weight import LearnedWeight
from .nag import NAG
from .pag import PAG
from .ramp import Ramp
from .rescale import Rescale
from .sag import SAG
from .samg import SAMG
from .scale_function import ScaleCallable, ScaleFunction
from .scfg import SCFG
from .seg import SEG
from .slg import SLG
from .stg import STG
from .tcfg import TCFG
from .tvcfg import TVCFG

__all__ = [
    "ADG",
    "APG",
    "CFG",
    "DPS",
    "DSG",
    "FDG",
    "NAG",
    "PAG",
    "SAG",
    "SAMG",
    "SCFG",
    "SEG",
    "SLG",
    "STG",
    "TCFG",
    "TVCFG",
    "AdaptiveGuidance",
    "AutoGuidance",
    "CFGPlusPlus",
    "CFGZeroStar",
    "Combinator",
    "DynamicCFG",
    "GuidanceStrategy",
    "Interval",
    "LearnedWeight",
    "Ramp",
    "Rescale",
    "ScaleCallable",
    "ScaleFunction",
    "get",
    "names",
]


def names(pattern: str | None = None) -> list[str]:
    """Registered strategy names, built-ins and plugins, optionally filtered by a glob ``pattern``."""
    return STRATEGIES.names(pattern)


def get(name: str) -> type[GuidanceStrategy]:
    """The strategy class registered as ``name`` (unknown names list the known ones)."""
    return STRATEGIES.get(name)
