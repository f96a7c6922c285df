"""guidekit: pluggable, tested guidance strategies for diffusion and flow samplers.

>>> import guidekit as gk
>>> gk.CFG(scale=7.5)
CFG(scale=7.5)
"""

from __future__ import annotations

from . import energy, ops, strategies
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
    FDG,
    SAMG,
    TCFG,
    TVCFG,
    AdaptiveGuidance,
    AutoGuidance,
    CFGPlusPlus,
    CFGZeroStar,
    DynamicCFG,
    GuidanceStrategy,
    Interval,
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
    "FDG",
    "REGISTRIES",
    "SAMG",
    "TCFG",
    "TVCFG",
    "AdaptiveGuidance",
    "AutoGuidance",
    "CFGPlusPlus",
    "CFGZeroStar",
    "ComponentSpec",
    "ConfigError",
    "DynamicCFG",
    "GuidanceContext",
    "GuidanceStrategy",
    "GuidekitError",
    "Interval",
    "LayoutError",
    "NonFiniteError",
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
    "guided",
    "load_spec",
    "ops",
    "sample",
    "strategies",
    "to_spec",
]
