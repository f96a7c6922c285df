"""The strategy interface every guidance method implements, and the :class:`Combinator` base.

A strategy talks to the engine (:mod:`guidekit.engine`) through declared members, each with a default, so
nothing is probed with ``getattr``:

* :meth:`GuidanceStrategy.branches` - the plan: which network evaluations this evaluation needs;
* :meth:`GuidanceStrategy.combine_branches` - the guided prediction from ``{branch name: prediction}``;
* :meth:`GuidanceStrategy.renoise_prediction` and :attr:`GuidanceStrategy.sampler_coupled` - the step hook
  of sampler-coupled methods (CFG++ steps along the unconditional noise);
* :meth:`GuidanceStrategy.models` - the models the plans may name (AutoGuidance's ``"weak"``);
* :meth:`GuidanceStrategy.follow_up` and :attr:`GuidanceStrategy.follows_up` - a second stage of branches
  at a sample built from the first stage's predictions (SAG);
* :meth:`GuidanceStrategy.contract_example` and :attr:`GuidanceStrategy.contract_exempt` - what the shared
  contract (:mod:`guidekit.testing`) checks.

Two-branch strategies write only :meth:`~GuidanceStrategy.combine` (or
:meth:`~GuidanceStrategy.combine_step`) and, to save the unconditional forward,
:meth:`~GuidanceStrategy.needs_uncond`; the defaults map them onto the branch protocol.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from ..branch import COND, UNCOND, FollowUp, Plan
from ..component import Component
from ..context import GuidanceContext, StrategySpace
from ..errors import ShapeError
from ..ops.checks import all_finite, check_finite, check_pair
from ..registry import STRATEGIES

__all__ = ["Combinator", "GuidanceStrategy", "Predictions", "nested_strategies"]

_BOTH: Plan = (COND, UNCOND)
_COND_ONLY: Plan = (COND,)  # the same tuples every evaluation: the engine recognises a plan by identity

Predictions = Mapping[str, Tensor]
"""``{branch name: prediction}`` in the strategy's space, as the engine hands them to a strategy."""


class GuidanceStrategy(Component, ABC):
    """Combine the predictions of the branches it asks for (by default ``cond`` and ``uncond``) into one.

    Tensors are ``(b, c, *spatial)`` of any rank (4D images, 5D video in ``(b, c, f, h, w)``); see
    :mod:`guidekit.ops.shapes` for other layouts. Built-in strategies are frozen dataclasses whose fields
    are their parameters, so they are immutable, comparable and serialisable with :func:`guidekit.to_spec`.

    Contract (checked for every registered name by :mod:`guidekit.testing`):

    * the output has the input's shape, dtype and device; batch elements are independent;
    * ``pred_cond == pred_uncond`` gives ``pred_cond``;
    * state lives only in what :meth:`init_state` / :meth:`combine_branches` pass around, and advances
      once per sampler step: the state a step's first evaluation (``ctx.substep == 0``) returns is what
      the step's corrector evaluations are handed and what the next step starts from; a corrector's
      returned state is discarded;
    * the plan (:meth:`branches`) names every prediction :meth:`combine_branches` reads.
    """

    registry: ClassVar = STRATEGIES
    space: ClassVar[StrategySpace] = "any"
    """The prediction space the math is defined in; the engine converts into it and back."""

    contract_exempt: ClassVar[Mapping[str, str]] = {}
    """Contract checks this class is exempt from, ``{check name: why}`` (documented departures only)."""

    # -- the plan: what the engine asks before the forward ---------------------------------------
    def needs_uncond(self, ctx: GuidanceContext) -> bool:
        """Two-branch strategies: whether this evaluation needs the unconditional prediction."""
        return True

    def needs_uncond_state(self, ctx: GuidanceContext, state: Any) -> bool:
        """Like :meth:`needs_uncond`, for strategies whose answer depends on their state."""
        return self.needs_uncond(ctx)

    def branches(self, ctx: GuidanceContext, state: Any) -> Plan:
        """The network evaluations this evaluation needs: ``(COND, UNCOND)``, ``(COND,)`` when the
        unconditional prediction is not needed, ``()`` when the network is not needed at all."""
        return _BOTH if self.needs_uncond_state(ctx, state) else _COND_ONLY

    def models(self) -> frozenset[str]:
        """The models this strategy's plans may name (``"main"``; AutoGuidance adds ``"weak"``)."""
        return frozenset({"main"})

    def perturbations(self) -> frozenset[str]:
        """The :attr:`~guidekit.branch.Perturbation.kind` names this strategy's plans may use (PAG adds
        ``"identity-self-attention"``); empty for strategies that never perturb the network."""
        return frozenset()

    def observers(self) -> frozenset[str]:
        """The attention maps this strategy's plans may record (``Branch.observe``): ``"self"`` and/or
        ``"cross"`` (SAG reads a self-attention map, S-CFG both); empty for strategies that read none."""
        return frozenset()

    def reads_condition(self) -> bool:
        """Whether the combine reads :attr:`GuidanceContext.condition` (learned weights per class). Where a
        front-end shows no condition (a diffusers pipeline or modular guider) such a strategy falls back to
        its condition-free rule, so its result there differs from the native loop's."""
        return False

    @property
    def sampler_coupled(self) -> bool:
        """Whether the sampler must step along :meth:`renoise_prediction` (CFG++), not the guided noise."""
        return False

    @property
    def follows_up(self) -> bool:
        """Whether :meth:`follow_up` may ask for a second stage (SAG); the engine asks only then."""
        return False

    def follow_up(self, preds: Predictions, ctx: GuidanceContext, state: Any) -> FollowUp | None:
        """A second stage of this evaluation, built from the first stage's predictions (in the strategy's
        space) and ``ctx.attention``: branches evaluated at another sample (SAG's degraded ``x̃``), whose
        predictions join ``preds`` before :meth:`combine_branches`. ``None`` (the default): no second stage."""
        return None

    # -- state ----------------------------------------------------------------------------------
    def init_state(self, like: Tensor) -> Any:
        """The state at the start of a run, for predictions shaped like ``like``; ``None`` if stateless."""
        return None

    # -- the combine ----------------------------------------------------------------------------
    @abstractmethod
    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        """The guided prediction, without input checks. Stateful strategies use a fresh state here."""

    def combine_step(
        self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext, state: Any
    ) -> tuple[Tensor, Any]:
        """One step with explicit state; stateless strategies need not override it."""
        return self.combine(pred_cond, pred_uncond, ctx), state

    def combine_branches(self, preds: Predictions, ctx: GuidanceContext, state: Any) -> tuple[Tensor, Any]:
        """The guided prediction and the new state from the plan's predictions (unchecked).

        The default maps ``preds["cond"]`` and ``preds["uncond"]`` (``cond`` again when the plan left the
        unconditional branch out) onto :meth:`combine_step`.
        """
        cond = preds["cond"]
        return self.combine_step(cond, preds.get("uncond", cond), ctx, state)

    def renoise_prediction(self, preds: Predictions, ctx: GuidanceContext, state: Any = None) -> Tensor | None:
        """The step hook of sampler-coupled strategies: the prediction whose noise the sampler steps along
        (CFG++: the unconditional one; DPS: the x0 before its loss correction), or ``None`` to step along
        the guided prediction's own noise. ``state`` is the state the evaluation's combine was handed."""
        return None

    # -- checked entry points -----------------------------------------------------------------------
    def step_branches(self, preds: Predictions, ctx: GuidanceContext, state: Any) -> tuple[Tensor, Any]:
        """:meth:`combine_branches` with its inputs and output checked (the engine calls this).

        Predictions must be floating point; an empty batch passes through untouched; a non-finite result
        names the input that caused it (not on ``meta`` tensors, which hold no values).
        """
        for name, pred in preds.items():
            if not pred.is_floating_point():
                raise ShapeError(f"pred_{name}: expected a floating-point tensor, got {pred.dtype}")
        first = next(iter(preds.values()), None)
        if first is not None and first.shape[0] == 0:  # an empty batch passes through
            return preds.get("cond", first), state
        out, state = self.combine_branches(preds, ctx, state)
        if not ctx.allow_nonfinite and out.device.type != "meta" and not all_finite(out):
            for name, pred in preds.items():
                check_finite(pred, f"pred_{name}")
            check_finite(out, "guided output")
        return out, state

    def step(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext, state: Any) -> tuple[Tensor, Any]:
        """Checked two-branch combine with explicit state: returns ``(guided, new_state)``."""
        check_pair(pred_cond, pred_uncond)
        return self.step_branches({"cond": pred_cond, "uncond": pred_uncond}, ctx, state)

    def __call__(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext | None = None) -> Tensor:
        """Stateless, checked call: ``step`` from a fresh state. ``ctx`` defaults to sigma = 1, step 0 of 1."""
        if ctx is None:
            check_pair(pred_cond, pred_uncond)
            ctx = GuidanceContext.default(pred_cond)
        out, _ = self.step(pred_cond, pred_uncond, ctx, self.init_state(pred_cond))
        return out

    # -- introspection --------------------------------------------------------------------------
    def scale_map(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor | None:
        """The effective guidance scale this strategy applies, broadcastable to the predictions.

        ``None`` when the strategy is not of the form ``u + Ω ⊙ (c - u)``. Spatial strategies (SAMG)
        return a ``(b, 1, *spatial)`` map; the engine records it when asked to.
        """
        return None

    @classmethod
    def contract_example(cls) -> GuidanceStrategy:
        """The instance the shared contract checks for this class (default: built with its defaults)."""
        return cls()


class Combinator(GuidanceStrategy):
    """A strategy around an ``inner`` one (Interval, Rescale, schedules).

    Space, state, the plan, the models, the step hook and ``sampler_coupled`` delegate to ``inner``, so a
    branch an inner strategy adds passes through untouched. Subclasses declare the ``inner`` dataclass
    field, implement :meth:`combine_branches` (calling ``inner.combine_branches``) and override only what
    they change; the two-branch entry points map onto :meth:`combine_branches`.
    """

    if TYPE_CHECKING:
        inner: GuidanceStrategy

    @property  # type: ignore[override]
    def space(self) -> StrategySpace:  # type: ignore[override]
        return self.inner.space

    def needs_uncond(self, ctx: GuidanceContext) -> bool:
        return self.inner.needs_uncond(ctx)

    def needs_uncond_state(self, ctx: GuidanceContext, state: Any) -> bool:
        return any(b.name == "uncond" for b in self.branches(ctx, state))

    def branches(self, ctx: GuidanceContext, state: Any) -> Plan:
        return self.inner.branches(ctx, state)

    def models(self) -> frozenset[str]:
        return self.inner.models()

    def perturbations(self) -> frozenset[str]:
        return self.inner.perturbations()

    def observers(self) -> frozenset[str]:
        return self.inner.observers()

    def reads_condition(self) -> bool:
        return self.inner.reads_condition()

    @property
    def sampler_coupled(self) -> bool:
        return self.inner.sampler_coupled

    @property
    def follows_up(self) -> bool:
        return self.inner.follows_up

    def follow_up(self, preds: Predictions, ctx: GuidanceContext, state: Any) -> FollowUp | None:
        return self.inner.follow_up(preds, ctx, state)

    def init_state(self, like: Tensor) -> Any:
        return self.inner.init_state(like)

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        return self.combine_step(pred_cond, pred_uncond, ctx, self.init_state(pred_cond))[0]

    def combine_step(
        self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext, state: Any
    ) -> tuple[Tensor, Any]:
        return self.combine_branches({"cond": pred_cond, "uncond": pred_uncond}, ctx, state)

    @abstractmethod
    def combine_branches(self, preds: Predictions, ctx: GuidanceContext, state: Any) -> tuple[Tensor, Any]: ...

    def renoise_prediction(self, preds: Predictions, ctx: GuidanceContext, state: Any = None) -> Tensor | None:
        return self.inner.renoise_prediction(preds, ctx, state)


def nested_strategies(strategy: object) -> list[GuidanceStrategy]:
    """The strategies a strategy holds in its attributes (``Interval.inner``, ...); ``[]`` for a leaf."""
    values = vars(strategy).values() if hasattr(strategy, "__dict__") else ()
    return [v for v in values if isinstance(v, GuidanceStrategy)]
