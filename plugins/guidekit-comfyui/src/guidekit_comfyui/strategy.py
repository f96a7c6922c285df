"""What flows along a ``GUIDEKIT_STRATEGY`` wire: a guidekit strategy, built when the schedule is known.

Most strategies are complete when their node runs. A percent-of-steps window is not: which sigmas bound
it depends on the schedule the sampler gets, so :class:`StrategyRef` resolves against the sigmas at
sampling time (:meth:`StrategyRef.resolve`). Nothing here imports ComfyUI.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from guidekit.config import build, to_spec
from guidekit.errors import ConfigError, GuidekitError
from guidekit.strategies.base import GuidanceStrategy

__all__ = ["NodeInputError", "StrategyRef"]


class NodeInputError(ValueError):
    """A node input ComfyUI's own validation let through but guidekit refuses: names the node and the field."""

    def __init__(self, node: str, message: str) -> None:
        super().__init__(f"{node}: {message}")
        self.node = node


Resolver = Callable[[Tensor | None], GuidanceStrategy]


@dataclass(frozen=True)
class StrategyRef:
    """A strategy, or how to build one from the sampler's schedule.

    Args:
        label: what made it (the node's display name), for messages.
        resolver: ``sigmas -> strategy``; ``sigmas`` is the sampler's EDM schedule, or ``None`` when a node
            checks its inputs before any sampling.
        needs_schedule: whether the strategy depends on the schedule (a percent window somewhere inside).
    """

    label: str
    resolver: Resolver
    needs_schedule: bool = False

    @classmethod
    def of(cls, strategy: GuidanceStrategy, label: str | None = None) -> StrategyRef:
        """A ready strategy (its spec is validated by :func:`guidekit.build` on the way in)."""
        if not isinstance(strategy, GuidanceStrategy):
            raise ConfigError(f"strategy: expected a guidekit GuidanceStrategy, got {type(strategy).__name__}")
        return cls(label or type(strategy).__name__, lambda sigmas: strategy)

    def resolve(self, sigmas: Tensor | None) -> GuidanceStrategy:
        """The strategy for a run over ``sigmas``; errors name the node that made it."""
        if sigmas is None and self.needs_schedule:
            raise GuidekitError(f"{self.label}: expected the sampler's sigmas to place a percent window, got None")
        try:
            return self.resolver(sigmas)
        except (ConfigError, GuidekitError) as exc:
            if str(exc).startswith(self.label):
                raise
            raise NodeInputError(self.label, str(exc)) from None

    def spec(self, sigmas: Tensor | None = None) -> dict[str, object]:
        """The resolved strategy's guidekit spec (JSON-ready), e.g. to save beside a workflow."""
        return to_spec(self.resolve(sigmas)).model_dump(mode="json")


def as_ref(value: object, node: str, field: str) -> StrategyRef:
    """A ``GUIDEKIT_STRATEGY`` input as a :class:`StrategyRef` (a bare strategy or spec is accepted too)."""
    if isinstance(value, StrategyRef):
        return value
    if isinstance(value, GuidanceStrategy):
        return StrategyRef.of(value)
    if isinstance(value, dict | str):
        try:
            return StrategyRef.of(build(value, where=field))  # type: ignore[arg-type]
        except (ConfigError, GuidekitError) as exc:
            raise NodeInputError(node, str(exc)) from None
    raise NodeInputError(
        node, f"{field}: expected a GUIDEKIT_STRATEGY (a guidekit strategy node's output), got {type(value).__name__}"
    )
