"""The guidance engine: one implementation of the rules of a guided evaluation, and its backends.

See :mod:`guidekit.engine.core` for the rules and ``docs/devdocs/engine.md`` for the protocol, the state rule
and how to add a backend.
"""

from __future__ import annotations

from .backend import Backend, NativeBackend, batch_cond, concat_cond
from .core import Engine, Evaluation, Pending, Position, StepRecord, groups

__all__ = [
    "Backend",
    "Engine",
    "Evaluation",
    "NativeBackend",
    "Pending",
    "Position",
    "StepRecord",
    "batch_cond",
    "concat_cond",
    "groups",
]
