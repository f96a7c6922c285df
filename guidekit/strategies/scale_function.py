"""A user's guidance schedule: any function of sigma or of progress, as a combinator."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..context import GuidanceContext
from ..errors import ConfigError
from ..ops.checks import check_choice, is_finite_number
from ..registry import STRATEGIES
from .base import GuidanceStrategy
from .cfg import CFG
from .scheduled import ScheduledScale

__all__ = ["ScaleCallable", "ScaleFunction", "resolve_function"]

Variable = Literal["sigma", "progress"]


def resolve_function(path: str) -> Callable[[float], float]:
    """Import ``"package.module:function"`` (or ``"package.module.function"``) and return it."""
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"function: expected an importable path such as 'my_pkg.schedules:ramp', got {path!r}")
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr) if module_name and attr else None
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"function: expected an importable 'module:function', got {path!r} ({exc})") from None
    if not callable(obj):
        raise ConfigError(f"function: expected {path!r} to name a callable, got {type(obj).__name__}")
    return obj


def _scales(fn: Callable[[float], float], name: str, variable: Variable, ctx: GuidanceContext) -> Tensor:
    """``fn`` at each sample's sigma (EDM) or at the run's progress, ``(b,)`` float64; checks the values."""
    b = ctx.sigma.shape[0]
    if variable == "progress":
        inputs = {ctx.progress: None}
        keys = torch.full((b,), ctx.progress, dtype=torch.float64)
    else:
        keys = ctx.sigma.detach().to("cpu", torch.float64)
        inputs = dict.fromkeys(keys.tolist())
    for x in inputs:
        try:
            value = fn(x)
        except Exception as exc:  # a user function may fail in any way: name it and its input
            raise ConfigError(f"function: {name}({variable}={x!r}) raised {type(exc).__name__}: {exc}") from exc
        if not is_finite_number(value):
            raise ConfigError(f"function: expected {name}({variable}={x!r}) to return a finite number, got {value!r}")
        inputs[x] = float(value)
    return torch.tensor([inputs[k] for k in keys.tolist()], dtype=torch.float64)


@STRATEGIES.register("scale-function")
@dataclass(frozen=True)
class ScaleFunction(ScheduledScale):
    """Run ``inner`` at the scale ``function(sigma)`` or ``function(progress)``; serialisable.

    ``function`` is an importable path (``"my_pkg.schedules:my_schedule"``), so the strategy round-trips
    through JSON configs; :class:`ScaleCallable` takes a plain Python callable instead. The function gets
    one float: the sample's EDM sigma (``variable="sigma"``, per sample) or ``ctx.progress = step / N``
    (``variable="progress"``), and returns the scale that replaces ``inner.scale``; 1 lets the loop skip
    the unconditional forward (with CFG).

    Args:
        function: ``"module:function"`` or ``"module.function"``, a callable ``float -> float``.
        inner: the strategy to run (default ``CFG(7.5)``; its own scale is replaced).
        variable: ``"sigma"`` (default) or ``"progress"``.
    """

    function: str
    inner: GuidanceStrategy = CFG(7.5)  # noqa: RUF009 - frozen, so a shared default is safe
    variable: Variable = "sigma"
    _fn: Callable[[float], float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check_inner()
        check_choice("variable", self.variable, ("sigma", "progress"))
        object.__setattr__(self, "_fn", resolve_function(self.function))

    @classmethod
    def contract_example(cls) -> ScaleFunction:
        """An instance for the shared contract tests (:func:`guidekit.ops.schedules.sigma_bump`)."""
        return cls("guidekit.ops.schedules:sigma_bump")

    def scale_at(self, ctx: GuidanceContext) -> Tensor:
        return _scales(self._fn, self.function, self.variable, ctx)


@dataclass(frozen=True)
class ScaleCallable(ScheduledScale):
    """:class:`ScaleFunction` with a plain Python callable: handy in a notebook, not serialisable.

    Not registered: :func:`guidekit.to_spec` refuses it; use :class:`ScaleFunction` for configs.
    """

    fn: Callable[[float], float]
    inner: GuidanceStrategy = CFG(7.5)  # noqa: RUF009 - frozen, so a shared default is safe
    variable: Variable = "sigma"

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ConfigError(f"fn: expected a callable float -> float, got {type(self.fn).__name__}")
        self._check_inner()
        check_choice("variable", self.variable, ("sigma", "progress"))

    def scale_at(self, ctx: GuidanceContext) -> Tensor:
        return _scales(self.fn, getattr(self.fn, "__name__", "fn"), self.variable, ctx)
