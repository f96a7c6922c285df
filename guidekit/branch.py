"""What a strategy asks the network for: :class:`Branch` (one batched forward's worth of rows) and
:class:`Perturbation` (what to change in the network for that forward).

A strategy's *plan* at one evaluation is a tuple of branches (``GuidanceStrategy.branches``); the engine
(:mod:`guidekit.engine`) groups branches that share ``(model, perturbation)`` into one batched forward per
group and hands the strategy ``{branch.name: prediction}``. The default plan is ``(COND, UNCOND)``;
``(COND,)`` when the unconditional prediction is not needed; ``()`` when the network is not needed at all
(CFG-Zero*'s zero-init steps).

This module sits beside :mod:`guidekit.context` at the bottom of the package: strategies, the engine and
the backends import it, it imports none of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import ClassVar, NamedTuple, TypeVar

from torch import Tensor

from .errors import ConfigError

T = TypeVar("T")

__all__ = [
    "COND",
    "UNCOND",
    "AttentionMaps",
    "Branch",
    "FollowUp",
    "NoPerturbation",
    "Perturbation",
    "Plan",
    "merge_plans",
    "observation_key",
    "split_observations",
]


class _Selected:
    """Layer selection shared by :class:`Perturbation` and :class:`AttentionMaps`: ``layers`` are selectors
    each backend resolves to its own modules, the same way (:meth:`matches`, :meth:`select`)."""

    role: ClassVar[str] = "layers"
    layers: tuple[str, ...]

    def matches(self, selector: str, name: str) -> bool:
        """Whether ``selector`` picks the module called ``name``: a regular-expression search, less
        diffusers' "fake integral match" (``pag_applied_layers``), so every backend reads a selector alike."""
        if re.search(selector, name) is None:
            return False
        last, own = selector.split(".")[-1], name.split(".")[-1]
        return not (last.isnumeric() and own.isnumeric() and last == own)

    def select(self, candidates: Mapping[str, T], what: str, owner: str) -> list[T]:
        """The candidates (``{module name: module}``) the ``layers`` selectors pick, in one list without
        repeats; a selector that picks none is refused, naming the ``what``s of ``owner`` there are."""
        return list(self.select_named(candidates, what, owner).values())

    def select_named(self, candidates: Mapping[str, T], what: str, owner: str) -> dict[str, T]:
        """Like :meth:`select`, keyed by module name."""
        chosen: dict[str, T] = {}
        for selector in self.layers:
            hits = {n: m for n, m in candidates.items() if self.matches(selector, n)}
            if not hits:
                shallow = sorted(n for n in candidates if n.count(".") <= 1)  # the blocks, not their sublayers
                shown = (
                    sorted(candidates) if len(candidates) <= 40 else [*shallow[:60], f"... ({len(candidates)} in all)"]
                )
                raise ConfigError(
                    f"{self.role}: layer selector {selector!r} matches no {what} of {owner}; its {what}s are {shown}"
                )
            chosen.update(hits)
        return chosen


@dataclass(frozen=True)
class Perturbation(_Selected):
    """What to change in the network for one forward (frozen, hashable, model-agnostic).

    Subclasses name a ``kind`` and the layers they act on with a selector (``layers``: names or patterns
    the backend resolves to its own modules). A backend lists the kinds it can apply
    (``Backend.perturbations``); the engine refuses a plan that needs another one before any forward,
    naming what the backend supports. :class:`NoPerturbation` is the identity. The concrete
    perturbations (PAG's identity self-attention, SEG's blurred queries, SLG/STG's skipped blocks, ...)
    are added by the methods that need them.
    """

    kind: ClassVar[str] = "perturbation"
    role: ClassVar[str] = "perturbation"
    layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.layers, tuple) or not all(isinstance(x, str) for x in self.layers):
            raise ConfigError(f"layers: expected a tuple of layer names or patterns, got {self.layers!r}")

    def conditions(self) -> tuple[str, ...]:
        """The conditions, beyond the branch's own, whose rows this perturbation's forward carries (NAG's
        negative context: ``("uncond",)``). A backend runs them in the same batch after the branches' rows
        and returns only the branches' predictions; the engine counts those rows in the NFE."""
        return ()


@dataclass(frozen=True)
class NoPerturbation(Perturbation):
    """The identity perturbation: the forward is the plain one (every backend supports it)."""

    kind: ClassVar[str] = "none"


@dataclass(frozen=True)
class AttentionMaps(_Selected):
    """Attention maps a branch asks its forward to record (SAG, S-CFG): the observer.

    ``layers`` select attention modules as perturbations do; ``which`` is ``"self"`` (self-attention),
    ``"cross"`` (cross-attention: a key that is not the query; diffusers' ``is_cross_attention``) or
    ``"both"``. The backend records, for the branch's rows, each selected layer's attention probabilities
    averaged over heads, ``(b, queries, keys)``, without changing the forward, and the engine hands them to
    the strategy as ``ctx.attention[branch name]["self:<layer>" or "cross:<layer>"]`` (in the order the
    layers ran). Nothing is hooked for a plan that asks for none.
    """

    role: ClassVar[str] = "observe"
    layers: tuple[str, ...] = ("mid",)
    which: str = "self"

    def __post_init__(self) -> None:
        if not isinstance(self.layers, tuple) or not self.layers or not all(isinstance(x, str) for x in self.layers):
            raise ConfigError(f"layers: expected a tuple of one or more layer selectors, got {self.layers!r}")
        if self.which not in ("self", "cross", "both"):
            raise ConfigError(f"which: expected 'self', 'cross' or 'both', got {self.which!r}")

    @property
    def kinds(self) -> frozenset[str]:
        """``{"self"}``, ``{"cross"}`` or both."""
        return frozenset({"self", "cross"}) if self.which == "both" else frozenset({self.which})


@dataclass(frozen=True)
class Branch:
    """One kind of network evaluation a strategy needs, named for the strategy's ``combine_branches``.

    Attributes:
        name: the key of its prediction (``"cond"``, ``"uncond"``, ``"weak"``, ``"perturbed"``, ...).
        condition: which of the caller's conditions it is evaluated with (``"cond"``, ``"uncond"`` or the
            name of an extra one).
        model: ``"main"`` or ``"weak"`` (AutoGuidance's guiding model), or another model the caller gives.
        perturbation: ``None`` (the plain forward) or a :class:`Perturbation`.
        grad: evaluate with the autograd graph back to the noisy sample: the strategy may differentiate
            the prediction with respect to ``ctx.x`` (loss guidance: DPS, DSG). Costs the forward's
            activations in memory; other branches run without a graph.
        observe: ``None`` or the :class:`AttentionMaps` to record during this branch's forward (it does not
            change the forward, so it does not change the grouping).
    """

    name: str
    condition: str = "cond"
    model: str = "main"
    perturbation: Perturbation | None = None
    grad: bool = False
    observe: AttentionMaps | None = None

    def __post_init__(self) -> None:
        for field in ("name", "condition", "model"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{field}: expected a non-empty string, got {value!r}")
        if not isinstance(self.grad, bool):
            raise ConfigError(f"grad: expected True or False, got {self.grad!r}")
        if self.perturbation is not None and not isinstance(self.perturbation, Perturbation):
            raise ConfigError(f"perturbation: expected None or a Perturbation, got {type(self.perturbation).__name__}")
        if self.observe is not None and not isinstance(self.observe, AttentionMaps):
            raise ConfigError(f"observe: expected None or AttentionMaps, got {type(self.observe).__name__}")

    @property
    def group(self) -> tuple[str, Perturbation | None, bool]:
        """Branches with the same ``(model, perturbation, grad)`` run in one batched forward."""
        perturbation = None if isinstance(self.perturbation, NoPerturbation) else self.perturbation
        return self.model, perturbation, self.grad


Plan = tuple[Branch, ...]
"""The branches one evaluation needs, in the order the engine batches them."""


class FollowUp(NamedTuple):
    """A second stage of one evaluation (SAG): branches evaluated at a sample the strategy built from the
    first stage's predictions (``GuidanceStrategy.follow_up``).

    Attributes:
        plan: the stage's branches (names distinct from the first stage's).
        x: the EDM sample ``(b, c, *spatial)`` they are evaluated at, at the evaluation's own sigma; their
            predictions are converted into the strategy's space at this ``x``.
    """

    plan: Plan
    x: Tensor


COND = Branch("cond", condition="cond")
"""The conditional prediction."""
UNCOND = Branch("uncond", condition="uncond")
"""The unconditional prediction (the negative prompt in a text-to-image pipeline)."""


def observation_key(branch: str, layer: str) -> str:
    """Where a backend returns the map of ``layer`` recorded for ``branch`` beside the predictions."""
    return f"{branch}{_OBSERVED}{layer}"


_OBSERVED = "@attention:"


def split_observations(
    native: Mapping[str, T],
) -> tuple[dict[str, T], dict[str, dict[str, T]]]:
    """A backend's answer split into ``{branch: prediction}`` and ``{branch: {layer: attention map}}``."""
    preds: dict[str, T] = {}
    maps: dict[str, dict[str, T]] = {}
    for key, value in native.items():
        branch, sep, layer = key.partition(_OBSERVED)
        if sep:
            maps.setdefault(branch, {})[layer] = value
        else:
            preds[key] = value
    return preds, maps


def merge_plans(*plans: Iterable[Branch]) -> Plan:
    """The union of plans, first occurrence first; two different branches with one name are refused, except
    that a branch that observes attention (``observe``) absorbs the same branch without it."""
    out: dict[str, Branch] = {}
    for plan in plans:
        for branch in plan:
            seen = out.setdefault(branch.name, branch)
            same = seen == branch or replace(seen, observe=None) == replace(branch, observe=None)
            if same and (seen.observe is None or branch.observe is None):
                out[branch.name] = seen if seen.observe is not None else branch
                continue
            if seen != branch:
                raise ConfigError(
                    f"branches: expected one definition per branch name, got {seen!r} and {branch!r} for "
                    f"{branch.name!r}"
                )
    return tuple(out.values())
