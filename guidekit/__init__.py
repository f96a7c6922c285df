"""guidekit: pluggable, tested guidance strategies for diffusion and flow samplers.

>>> import guidekit as gk
>>> gk.CFG(scale=7.5)
CFG(scale=7.5)
"""

from __future__ import annotations

from . import functional, layout, strategies
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
from .registry import REGISTRIES, Registry
from .strategies import CFG, GuidanceStrategy

__version__ = "0.1.0"

__all__ = [
    "CFG",
    "REGISTRIES",
    "ComponentSpec",
    "ConfigError",
    "GuidanceContext",
    "GuidanceStrategy",
    "GuidekitError",
    "LayoutError",
    "NonFiniteError",
    "PluginError",
    "Registry",
    "ShapeError",
    "UnknownNameError",
    "build",
    "functional",
    "layout",
    "load_spec",
    "strategies",
    "to_spec",
]
