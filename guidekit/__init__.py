"""guidekit: pluggable, tested guidance strategies for diffusion and flow samplers.

>>> import guidekit as gk
>>> gk.CFG(scale=7.5)
CFG(scale=7.5)
"""

from __future__ import annotations

from . import energy, functional, layout, strategies
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
from .strategies import APG, CFG, SAMG, GuidanceStrategy, Interval, Rescale

__version__ = "0.1.0"

__all__ = [
    "APG",
    "CFG",
    "REGISTRIES",
    "SAMG",
    "ComponentSpec",
    "ConfigError",
    "GuidanceContext",
    "GuidanceStrategy",
    "GuidekitError",
    "Interval",
    "LayoutError",
    "NonFiniteError",
    "PluginError",
    "Registry",
    "Rescale",
    "ShapeError",
    "StepRecord",
    "UnknownNameError",
    "build",
    "energy",
    "functional",
    "guided",
    "layout",
    "load_spec",
    "sample",
    "strategies",
    "to_spec",
]
