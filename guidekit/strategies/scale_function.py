"""A user's guidance schedule: any function of sigma or of progress, as a combinator.

Configs name *registered* scale functions (:data:`guidekit.registry.SCALE_FUNCTIONS`), never an import
path: building a spec imports nothing and cannot reach ``sys:exit`` or ``time:sleep``. Register your own
with ``@SCALE_FUNCTIONS.register("my-schedule")`` in code, or ship it in a package under the entry-point
group ``guidekit.scale_functions``; registering is the explicit opt-in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..context import GuidanceContext
from ..errors import ConfigError
from ..ops.checks import check_choice, is_finite_number
from ..ops.schedules import sigma_bump
from ..registry import SCALE_FUNCTIONS, STRATEGIES
from .base import GuidanceStrategy
from .cfg import CFG
from .scheduled import ScheduledScale

__all__ = ["ScaleCallable", "ScaleFunction", "resolve_function"]

Variable = Literal["sigma", "progress"]


SCALE_FUNCTIONS.register("sigma-bump", sigma_bump)
SCALE_FUNCTIONS.register("guidekit.scale_schedules:sigma_bump", sigma_bump)  # the path configs used to name (moved)


def _import_paths(fn: Callable[..., object]) -> tuple[str, str]:
    """``("module:qualname", "module.qualname")`` of a function, read from it (nothing is imported)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return f"{module}:{qualname}", f"{module}.{qualname}"


def resolve_function(ref: str) -> Callable[[float], float]:
    """The scale function registered as ``ref``, or the registered function whose import path is ``ref``.

    Nothing is imported on behalf of ``ref``: a function that is not registered is refused.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(
            f"function: expected the name of a registered scale function such as 'sigma-bump', got {ref!r}"
        )
    if ref in SCALE_FUNCTIONS:
        return SCALE_FUNCTIONS.get(ref)
    for fn in map(SCALE_FUNCTIONS.get, SCALE_FUNCTIONS.names()):
        if ref in _import_paths(fn):
            return fn
    raise ConfigError(
        f"function: expected a registered scale function ({', '.join(SCALE_FUNCTIONS.names())}) or the "
        f"'module:function' path of one, got {ref!r}; configs never import modules, so register yours "
        "first: @SCALE_FUNCTIONS.register('my-schedule') (from guidekit.registry import SCALE_FUNCTIONS)"
    )


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
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a user function may fail in any way, SystemExit included: name it
            raise ConfigError(f"function: {name}({variable}={x!r}) raised {type(exc).__name__}: {exc}") from exc
        if not is_finite_number(value):
            raise ConfigError(f"function: expected {name}({variable}={x!r}) to return a finite number, got {value!r}")
        inputs[x] = float(value)
    return torch.tensor([inputs[k] for k in keys.tolist()], dtype=torch.float64)


@STRATEGIES.register("scale-function")
@dataclass(frozen=True)
class ScaleFunction(ScheduledScale):
    """Run ``inner`` at the scale ``function(sigma)`` or ``function(progress)``; serialisable.

    ``function`` names a registered scale function (``"sigma-bump"``, or yours after
    ``@SCALE_FUNCTIONS.register("my-schedule")``), so the strategy round-trips through JSON configs
    without importing anything; :class:`ScaleCallable` takes a plain Python callable instead. The function gets
    one float: the sample's EDM sigma (``variable="sigma"``, per sample) or ``ctx.progress = step / N``
    (``variable="progress"``), and returns the scale that replaces ``inner.scale``; 1 lets the loop skip
    the unconditional forward (with CFG).

    Args:
        function: the name of a registered ``float -> float`` (:data:`guidekit.registry.SCALE_FUNCTIONS`),
            or the ``"module:function"`` / ``"module.function"`` path of a registered one.
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
        return cls("sigma-bump")

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
