"""guidekit: pluggable, tested guidance strategies for diffusion and flow samplers.

>>> import guidekit as gk
>>> gk.CFG(scale=7.5)
CFG(scale=7.5)
"""

from __future__ import annotations

from . import energy, engine, losses, ops, perturbations, strategies
from .branch import COND, UNCOND, AttentionMaps, Branch, FollowUp, NoPerturbation, Perturbation
from .config import ComponentSpec, build, load_spec, to_spec
from .context import GuidanceContext
from .errors import (
    ConfigError,
    GuidekitError,
    LayoutError,
    NonFiniteError,
    PluginError,
    ShapeError,
    UnknownNameError,
)
from .guided import StepRecord, guided, sample
from .registry import REGISTRIES, Registry
from .strategies import (
    ADG,
    APG,
    CFG,
    DPS,
    DSG,
    FDG,
    NAG,
    PAG,
    SAG,
    SAMG,
    SCFG,
    SEG,
    SLG,
    STG,
    TCFG,
    TVCFG,
    AdaptiveGuidance,
    AutoGuidance,
    CFGPlusPlus,
    CFGZeroStar,
    Combinator,
    DynamicCFG,
    GuidanceStrategy,
    Interval,
    LearnedWeight,
    Ramp,
    Rescale,
    ScaleCallable,
    ScaleFunction,
)

__version__ = "0.1.0"

__all__ = [
    "ADG",
    "APG",
    "CFG",
    "COND",
    "DPS",
    "DSG",
    "FDG",
    "NAG",
    "PAG",
    "REGISTRIES",
    "SAG",
    "SAMG",
    "SCFG",
    "SEG",
    "SLG",
    "STG",
    "TCFG",
    "TVCFG",
    "UNCOND",
    "AdaptiveGuidance",
    "AttentionMaps",
    "AutoGuidance",
    "Branch",
    "CFGPlusPlus",
    "CFGZeroStar",
    "Combinator",
    "ComponentSpec",
    "ConfigError",
    "DynamicCFG",
    "FollowUp",
    "GuidanceContext",
    "GuidanceStrategy",
    "GuidekitError",
    "Interval",
    "LayoutError",
    "LearnedWeight",
    "NoPerturbation",
    "NonFiniteError",
    "Perturbation",
    "PluginError",
    "Ramp",
    "Registry",
    "Rescale",
    "ScaleCallable",
    "ScaleFunction",
    "ShapeError",
    "StepRecord",
    "UnknownNameError",
    "build",
    "energy",
    "engine",
    "guided",
    "load_spec",
    "losses",
    "ops",
    "perturbations",
    "sample",
    "strategies",
    "to_spec",
]
