"""Exceptions raised by guidekit. Every message names the argument, what was expected and what was received."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "GuidekitError",
    "LayoutError",
    "NonFiniteError",
    "PluginError",
    "ShapeError",
    "UnknownNameError",
]


class GuidekitError(Exception):
    """Base class of every error guidekit raises on purpose."""


class ConfigError(GuidekitError, ValueError):
    """A parameter or a config spec is invalid (e.g. ``w_min > w_max``, an unknown field)."""


class ShapeError(GuidekitError, ValueError):
    """Tensors do not have the shapes, dtypes or devices the call needs."""


class LayoutError(ShapeError):
    """A layout string is malformed or does not match the tensor it describes."""


class NonFiniteError(GuidekitError, FloatingPointError):
    """A prediction contains NaN or Inf (pass ``allow_nonfinite=True`` to let it through)."""


class PluginError(GuidekitError, ImportError):
    """A plugin registered through an entry point could not be loaded."""


class UnknownNameError(GuidekitError, KeyError):
    """A registry lookup failed; the message lists the known names and the closest match."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""
