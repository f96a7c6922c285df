"""Branch-parallel guidance over ``torch.distributed`` (``torchrun``, ``accelerate launch``; gloo or NCCL).

Every rank runs the same sampler on the same noise; each forward's ``branches x batch`` rows are spread
over the ranks and all-gathered, so every rank ends with the same sample (``docs/distributed.md``)::

    import torch.distributed as dist
    from guidekit import distributed

    dist.init_process_group("nccl")                      # or "gloo" on CPU
    den = distributed.guided(adapter, gk.CFG(5.0), cond, uncond)
    x0 = gk.samplers.sample_euler(den, x, sigmas)        # same x0 on every rank

:func:`wrap` makes an existing guided denoiser (or engine) branch-parallel; :class:`DistributedBackend`
wraps any backend.
"""

from __future__ import annotations

from typing import Any

from ..engine import Engine
from ..errors import ConfigError
from ..guided import GuidedDenoiser
from ..guided import guided as _guided
from ..samplers.adapters import ModelAdapter
from ..strategies.base import GuidanceStrategy
from .backend import DistributedBackend, slice_cond
from .placement import Call, calls, row_range

__all__ = ["Call", "DistributedBackend", "calls", "guided", "row_range", "slice_cond", "wrap"]


def wrap(target: GuidedDenoiser | Engine, group: Any = None) -> GuidedDenoiser | Engine:
    """Make ``target`` branch-parallel over ``group`` (in place; returns it): its engine's backend is wrapped
    in a :class:`DistributedBackend`. Call it on every rank, before the run's first evaluation."""
    engine = target.engine if isinstance(target, GuidedDenoiser) else target
    if not isinstance(engine, Engine):
        raise ConfigError(f"target: expected a GuidedDenoiser or an Engine, got {type(target).__name__}")
    if isinstance(engine.backend, DistributedBackend):
        raise ConfigError("target: expected a denoiser that is not distributed yet, got one already wrapped")
    if engine.forwards:
        raise ConfigError(
            f"target: expected a denoiser before its first evaluation, got one after {engine.forwards} forwards "
            "(wrap it on every rank before sampling)"
        )
    engine.backend = DistributedBackend(engine.backend, group, strategy=repr(engine.strategy))
    return target


def guided(
    model: ModelAdapter,
    strategy: GuidanceStrategy | None = None,
    cond: Any = None,
    uncond: Any = None,
    *,
    group: Any = None,
    **options: Any,
) -> GuidedDenoiser:
    """:func:`guidekit.guided`, branch-parallel over ``group`` (``options``: its keyword arguments)."""
    den = _guided(model, strategy, cond, uncond, **options)
    wrap(den, group)
    return den
