"""Guidance strategies. Importing this package registers every built-in.

``names()`` lists registered names (plugins included); ``get(name)`` returns the class.
"""

from __future__ import annotations

from ..registry import STRATEGIES
from .apg import APG
from .base import GuidanceStrategy
from .cfg import CFG
from .interval import Interval
from .rescale import Rescale
from .samg import SAMG

__all__ = ["APG", "CFG", "SAMG", "GuidanceStrategy", "Interval", "Rescale", "get", "names"]


def names(pattern: str | None = None) -> list[str]:
    """Registered strategy names, built-ins and plugins, optionally filtered by a glob ``pattern``."""
    return STRATEGIES.names(pattern)


def get(name: str) -> type[GuidanceStrategy]:
    """The strategy class registered as ``name`` (unknown names list the known ones)."""
    return STRATEGIES.get(name)
