"""The engine: the one place that knows the rules of a guided evaluation.

::

    ctx   = GuidanceContext(sigma, step, substep, schedule, space, x, condition)
    plan  = strategy.branches(ctx, state)                          -> (Branch, ...)
    preds = backend.forward(x, sigma, group) per (model, perturbation) group, -> strategy.space
    g, s' = strategy.step_branches(preds, ctx, state)              (checked combine)
    state = s' if substep == 0                                     (once per step, never by a corrector)
    out   = g -> the caller's space (x0 for samplers, the model's own for a pipeline's scheduler)
    NFE  += rows evaluated / batch ; StepRecord(step) updated

**State rule.** The state a step's first evaluation (``substep == 0``) returns is committed at once: the
step's corrector evaluations (Heun's second, ...) are handed it and their returned state is discarded,
and the next step starts from it. So a corrector follows its step's decisions (Adaptive Guidance's
switch) and never advances a buffer (APG's momentum). A step index at ``substep == 0`` that is not after
the last one starts a new run: state, NFE and records are reset.

Callers: :func:`guidekit.guided` (native samplers), the diffusers pipeline path and the diffusers modular
guider (:mod:`guidekit.integrations.diffusers`). None of them keeps its own copy of these rules.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from ..branch import Branch, Perturbation, Plan, split_observations
from ..context import GuidanceContext
from ..errors import ConfigError, GuidekitError, ShapeError
from ..ops.spaces import PredictionSpace, compute_dtype, convert, x_for_space
from ..strategies.base import GuidanceStrategy, nested_strategies
from .backend import Backend

__all__ = ["Engine", "Evaluation", "Pending", "Position", "StepRecord"]

_UNSET: Any = object()


class Position(NamedTuple):
    """Where an evaluation sits in its run (a named tuple: built once per evaluation, cheaply).

    Attributes:
        step, num_steps: the sampler step and the number of steps.
        substep: 0 for a step's first evaluation, 1 (2, ...) for corrector evaluations.
        sigmas: the schedule (EDM sigmas, ``num_steps + 1`` values ending at 0) when the caller knows it.
        step_sigma: the step's schedule value as a Python float (float64), when known.
        sigma_next: the sigma the step moves to, when known.
    """

    step: int
    num_steps: int
    substep: int = 0
    sigmas: Tensor | None = None
    step_sigma: float | None = None
    sigma_next: float | None = None


@dataclass(frozen=True)
class StepRecord:
    """What happened in one sampler step (all of its evaluations).

    Attributes:
        step: step index; ``sigma`` -> ``sigma_next`` its EDM noise levels.
        nfe: network evaluations per sample so far, this step included (the rows evaluated over the batch:
            a batched ``[cond; uncond]`` forward counts 2, a skipped network 0).
        uncond_used: whether any evaluation of this step ran a second branch (unconditional, weak, ...).
        model_called: whether the network ran at all this step (False on CFG-Zero*'s zero-init steps).
        scale_mean, scale_min, scale_max: statistics of ``strategy.scale_map`` at the step's first
            evaluation, over the batch; ``None`` when the strategy has no scale map or did not guide.
        scale_map: the map itself (detached), only with ``record_scale_maps=True``.
        branches: the branch names evaluated in this step, in order of first use.
    """

    step: int
    sigma: float
    sigma_next: float
    nfe: int
    uncond_used: bool
    model_called: bool
    scale_mean: float | None = None
    scale_min: float | None = None
    scale_max: float | None = None
    scale_map: Tensor | None = None
    branches: tuple[str, ...] = ()


@dataclass
class _StepLog:
    sigma: float
    sigma_next: float
    nfe: int = 0
    uncond_used: bool = False
    model_called: bool = False
    scales: tuple[float, float, float] | None = None
    scale_map: Tensor | None = None
    branches: tuple[str, ...] = ()


class _PlanFacts(NamedTuple):
    """What the engine derives from a plan, once per distinct plan."""

    groups: list[list[Branch]]
    names: tuple[str, ...]
    beyond_cond: bool
    graph: bool
    rows: int
    """Network rows per sample: one per branch, plus the rows of conditions a perturbation carries (NAG)."""
    observes: bool
    """Whether a branch records attention maps (the backend's answer then holds them beside the predictions)."""


class Pending(NamedTuple):
    """An evaluation between its plan and its forward (for backends that run the network themselves)."""

    ctx: GuidanceContext
    plan: Plan
    state: Any
    x: Tensor | None
    sigma: Tensor
    xs: Mapping[str, Tensor] | None = None
    """The sample a branch was evaluated at where it is not ``x`` (a follow-up stage's, SAG's ``x̃``)."""


class Evaluation(NamedTuple):
    """The engine's answer: the guided prediction in the caller's space, and the noise to step along.

    ``renoise`` is ``None`` unless the strategy is sampler-coupled (CFG++): then it is the ``eps`` of the
    prediction whose noise the sampler steps along.
    """

    guided: Tensor
    renoise: Tensor | None


class Engine:
    """One guided run: a strategy, a backend and the caller's conditions; :meth:`evaluate` per evaluation.

    Args:
        strategy: the guidance strategy.
        backend: what runs the network (:class:`~guidekit.engine.NativeBackend`, a diffusers backend, ...).
        conditions: the conditions branches name (``{"cond": ..., "uncond": ...}``; extra names for extra
            branches).
        output: the space of :attr:`Evaluation.guided`: ``"x0"`` for samplers, ``"native"`` for the main
            model's own prediction (a pipeline's scheduler consumes it).
        allow_nonfinite: let NaN/Inf through instead of raising :class:`~guidekit.errors.NonFiniteError`.
        record_scales, record_scale_maps: put ``strategy.scale_map`` statistics (and maps) in the records.
        max_batch: the most rows one forward may take (memory): a group of ``k`` branches on a batch of
            ``b`` runs as forwards of ``max_batch // b`` branches; NFE is unchanged, ``forwards`` grows.
    """

    def __init__(
        self,
        strategy: GuidanceStrategy,
        backend: Backend,
        conditions: Mapping[str, Any],
        *,
        output: Literal["x0", "native"] = "x0",
        allow_nonfinite: bool = False,
        record_scales: bool = False,
        record_scale_maps: bool = False,
        max_batch: int | None = None,
    ) -> None:
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
            raise ConfigError(f"max_batch: expected None or an integer >= 1 (rows per forward), got {max_batch!r}")
        self.max_batch = max_batch
        if not isinstance(strategy, GuidanceStrategy):
            raise ConfigError(f"strategy: expected a GuidanceStrategy, got {type(strategy).__name__}")
        if output not in ("x0", "native"):
            raise ConfigError(f"output: expected 'x0' or 'native', got {output!r}")
        needed, given = strategy.models(), backend.models()
        if not needed <= given:
            missing = sorted(needed - given)
            raise ConfigError(
                f"{missing[0]}_model: expected the {missing[0]} model, since {type(strategy).__name__} evaluates "
                f"it (AutoGuidance's guiding model); got None"
                if missing[0] != "main"
                else f"backend: expected a main model, got {sorted(given)}"
            )
        unused = sorted(given - needed)
        if unused:
            raise ConfigError(
                f"{unused[0]}_model: expected None, since {type(strategy).__name__} never evaluates a "
                f"{unused[0]!r} model (only AutoGuidance does); got one"
            )
        _check_coupling(strategy)
        self.strategy, self.backend = strategy, backend
        self.conditions = dict(conditions)
        self.output = output
        self.allow_nonfinite = allow_nonfinite
        self.record_scales = record_scales or record_scale_maps
        self.record_scale_maps = record_scale_maps
        self.space: PredictionSpace = self._resolve_space()
        self._native = backend.prediction("main")
        self._coupled = strategy.sampler_coupled
        self._follows = strategy.follows_up
        self._lock = threading.Lock()
        self._facts: dict[Plan, _PlanFacts] = {}
        self._last_plan: tuple[Plan, _PlanFacts] | None = None
        self._next: tuple[tuple[float, int, torch.dtype, torch.device], Tensor] | None = None
        self._sigmas: tuple[Tensor | None, Tensor | None] = (None, None)
        self._reset()

    def _resolve_space(self) -> PredictionSpace:
        space, main = self.strategy.space, self.backend.prediction("main")
        if space not in ("any", "native"):
            return space  # type: ignore[return-value]
        if space == "native":
            for name in sorted(self.backend.models() - {"main"}):
                other = self.backend.prediction(name)
                if other != main:
                    raise ConfigError(
                        f"{name}_model: expected prediction {main!r} like the model, since strategy "
                        f"{type(self.strategy).__name__} works in the native space; got {other!r}"
                    )
        return main

    def _reset(self) -> None:
        self.nfe = 0
        """Network evaluations per sample so far (rows evaluated / batch)."""
        self.forwards = 0
        """Backend calls so far (one per group of branches)."""
        self._state: Any = _UNSET
        self._step = -1
        self._log: dict[int, _StepLog] = {}

    # -- one evaluation ----------------------------------------------------------------------------
    def evaluate(self, x: Tensor, sigma: Tensor, position: Position) -> Evaluation:
        """Plan, forward, combine and record one evaluation at EDM ``(x, sigma)`` (``sigma`` per sample)."""
        if not self._lock.acquire(blocking=False):
            raise GuidekitError(
                "engine: expected one evaluation at a time, got a second one from another thread while the first "
                "runs (build one guided denoiser per run and thread)"
            )
        try:
            pending = self.plan(x, sigma, position)
            preds = self.run(pending)
            if self._follows:
                pending, preds = self.follow(pending, preds)
            return self.complete(pending, preds)
        finally:
            self._lock.release()

    def preview(self, sigma: Tensor, position: Position) -> Plan:
        """The plan an evaluation at ``position`` would get, without running or recording anything.

        For backends that must say how many branches they will run before they see the sample (a modular
        guider's ``num_conditions``); :meth:`plan` at the same position gives the same plan.
        """
        restart = position.substep == 0 and position.step <= self._step
        state = _UNSET if restart else self._state
        if state is _UNSET:
            state = self.strategy.init_state(_placeholder(sigma))
        return self.strategy.branches(self._context(None, sigma, position, sigma.device, sigma.dtype), state)

    def plan(self, x: Tensor | None, sigma: Tensor, position: Position, *, like: Tensor | None = None) -> Pending:
        """The context, the plan and the state of an evaluation (before any forward).

        ``x`` is EDM ``x``, ``None`` for a backend that never sees it (a modular guider; the strategy's
        space must then be the model's own). ``like`` shapes a first state when ``x`` is ``None``.
        """
        anchor = x if x is not None else like
        dtype = compute_dtype(anchor) if anchor is not None else torch.float32
        device = anchor.device if anchor is not None else sigma.device
        sigma = sigma.to(device=device, dtype=dtype)
        self._enter(position, sigma)
        if self._state is _UNSET and anchor is not None:
            self._state = self.strategy.init_state(anchor)
        state = self._state if self._state is not _UNSET else self.strategy.init_state(_placeholder(sigma))
        ctx = self._context(x, sigma, position, device, dtype)
        plan = self.strategy.branches(ctx, state)
        facts = self._plan_facts(plan)
        if x is not None and facts.graph:  # loss guidance: predictions with a graph to x
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                ctx = ctx.replace(x=x_for_space(x, sigma, self.space))
        elif x is None and (facts.graph or self._follows):
            what = (
                "differentiates through the model" if facts.graph else "evaluates a second stage at a sample it builds"
            )
            raise ConfigError(
                f"strategy: {type(self.strategy).__name__} {what}, which needs the noisy sample; this backend "
                "never shows it (use guidekit.sample or generate)"
            )
        return Pending(ctx, plan, state, x, sigma)

    def _context(
        self, x: Tensor | None, sigma: Tensor, position: Position, device: torch.device, dtype: torch.dtype
    ) -> GuidanceContext:
        sigmas, nxt, b = position.sigmas, position.sigma_next, sigma.shape[0]
        return GuidanceContext(
            sigma=sigma,
            step=position.step,
            num_steps=position.num_steps,
            substep=position.substep,
            sigmas=None if sigmas is None else self._sigmas_as(sigmas, device, dtype),
            sigma_next=None if nxt is None else self._full(nxt, b, dtype, device),
            space=self.space,
            x=None if x is None or self.space is None else x_for_space(x, sigma, self.space),
            allow_nonfinite=self.allow_nonfinite,
            step_sigma=position.step_sigma,
            condition=self._condition(b),
        )

    def _condition(self, batch: int) -> Tensor | None:
        """The ``cond`` condition for :attr:`GuidanceContext.condition`: a tensor with one row per sample."""
        cond = self.conditions.get("cond")
        return cond if isinstance(cond, Tensor) and cond.ndim > 0 and cond.shape[0] == batch else None

    def _plan_facts(self, plan: Plan) -> _PlanFacts:
        """The plan's groups and branch names, checked against the backend once per distinct plan (the last
        plan is recognised by identity: strategies hand back the same tuple step after step)."""
        last = self._last_plan
        if last is not None and last[0] is plan:
            return last[1]
        facts = self._facts.get(plan)
        if facts is None:
            for branch in plan:
                self.backend.check_branch(branch)
            facts = self._facts[plan] = _PlanFacts(
                list(groups(plan).values()),
                tuple(b.name for b in plan),
                any(b.name != "cond" for b in plan),
                any(b.grad for b in plan),
                sum(1 + (len(b.perturbation.conditions()) if b.perturbation is not None else 0) for b in plan),
                any(b.observe is not None for b in plan),
            )
        self._last_plan = (plan, facts)
        return facts

    def _full(self, value: float, b: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``(b,)`` of ``value`` (the next sigma), made once per distinct value: a step's evaluations share it."""
        last = self._next
        if last is not None and last[0] == (value, b, dtype, device):
            return last[1]
        out = torch.full((b,), value, dtype=dtype, device=device)
        self._next = ((value, b, dtype, device), out)
        return out

    def _sigmas_as(self, sigmas: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The schedule in the compute dtype, converted once per run (the sampler hands the same tensor)."""
        source, converted = self._sigmas
        if source is not sigmas or converted is None or converted.dtype != dtype or converted.device != device:
            converted = sigmas.to(device=device, dtype=dtype)
            self._sigmas = (sigmas, converted)
        return converted

    def run(self, pending: Pending) -> dict[str, Tensor]:
        """The plan's forwards through the backend: one batched call per ``(model, perturbation)`` group."""
        if pending.x is None:
            raise ConfigError("x: expected the noisy sample to run the backend, got None")
        grouped = self._plan_facts(pending.plan).groups
        if self.max_batch is not None:
            grouped = self._split(grouped, pending.x.shape[0])
        self.forwards += len(grouped)
        if not pending.x.requires_grad:
            return self.backend.forward_plan(pending.x, pending.sigma, grouped, self.conditions)
        with torch.enable_grad():  # branches with grad=True keep their graph back to x
            preds = self.backend.forward_plan(
                pending.x, pending.sigma, [g for g in grouped if g[0].grad], self.conditions
            )
        plain = [g for g in grouped if not g[0].grad]
        if plain:
            with torch.no_grad():
                preds.update(self.backend.forward_plan(pending.x.detach(), pending.sigma, plain, self.conditions))
        return preds

    def follow(self, pending: Pending, native: Mapping[str, Tensor]) -> tuple[Pending, dict[str, Tensor]]:
        """The strategy's second stage (:meth:`GuidanceStrategy.follow_up`, SAG), if it asks for one: its
        branches run at the sample it builds from the first stage's predictions, and join the plan (their
        predictions are converted at that sample; they count in the NFE like any branch)."""
        ctx, plan, state, x, sigma = pending[:5]
        assert x is not None
        answers, maps = split_observations(native)
        if maps:
            ctx = ctx.replace(attention=maps)
        preds = {b.name: self._to_space(answers[b.name], b, x, sigma) for b in plan}
        stage = self.strategy.follow_up(preds, ctx, state)
        if stage is None:
            return pending, dict(native)
        clash = sorted({b.name for b in stage.plan} & set(preds))
        if clash:
            raise ConfigError(f"follow_up: expected branch names other than the first stage's, got {clash} again")
        if stage.x.shape != x.shape:
            raise ShapeError(f"follow_up: expected a sample of shape {tuple(x.shape)}, got {tuple(stage.x.shape)}")
        for branch in stage.plan:
            self.backend.check_branch(branch)
        x2 = stage.x.detach().to(dtype=x.dtype)
        grouped = list(groups(stage.plan).values())
        if self.max_batch is not None:
            grouped = self._split(grouped, x.shape[0])
        self.forwards += len(grouped)
        with torch.no_grad():
            second = self.backend.forward_plan(x2, sigma, grouped, self.conditions)
        full = Pending(pending.ctx, plan + stage.plan, state, x, sigma, {b.name: x2 for b in stage.plan})
        return full, {**native, **second}

    def _split(self, grouped: list[list[Branch]], batch: int) -> list[list[Branch]]:
        """Groups cut into forwards of at most ``max_batch`` rows (whole branches of ``batch`` rows each, and
        the rows of the conditions a branch's perturbation carries with it: NAG's branch is ``2 · batch``)."""
        assert self.max_batch is not None
        out: list[list[Branch]] = []
        for group in grouped:
            carried = group[0].perturbation.conditions() if group[0].perturbation is not None else ()
            width = batch * (1 + len(carried))
            per = self.max_batch // width
            if per < 1:
                raise ConfigError(
                    f"max_batch: expected at least the rows of one branch ({width} rows, one branch per forward), "
                    f"got {self.max_batch}"
                )
            out.extend(group[i : i + per] for i in range(0, len(group), per))
        return out

    def complete(self, pending: Pending, native: Mapping[str, Tensor]) -> Evaluation:
        """Convert the plan's predictions, combine, commit the state and record (after the forwards)."""
        ctx, plan, state, x, sigma, xs = pending
        if self._plan_facts(plan).observes:
            native, maps = split_observations(native)
            unseen = [b.name for b in plan if b.observe is not None and b.name not in maps]
            if unseen:
                raise ConfigError(
                    f"backend: expected the attention maps branches {unseen} observe, got none from "
                    f"{type(self.backend).__name__} (it does not record attention maps; use guidekit.sample or "
                    "generate)"
                )
            ctx = ctx.replace(attention=maps)
        missing = [b.name for b in plan if b.name not in native]
        if missing:
            raise ConfigError(f"predictions: expected one for every branch of the plan, missing {missing}")
        like = next(iter(native.values())) if native else x
        if self._state is _UNSET and like is not None:
            state = self._state = self.strategy.init_state(like)
        graph = x is not None and x.requires_grad
        if x is None and native and ctx.sigma.dtype != compute_dtype(like):  # type: ignore[arg-type]
            ctx = ctx.replace(sigma=ctx.sigma.to(compute_dtype(like)))  # type: ignore[arg-type]
        if graph:
            with torch.enable_grad():
                preds, guided, new_state, renoise = self._combine(plan, native, ctx, state, x, sigma, xs)
        else:
            preds, guided, new_state, renoise = self._combine(plan, native, ctx, state, x, sigma, xs)
        if graph:  # nothing that leaves the evaluation keeps the graph
            x, guided, new_state = x.detach(), guided.detach(), detach_tree(new_state)
            renoise = None if renoise is None else renoise.detach()
            preds = {k: v.detach() for k, v in preds.items()}
        if ctx.substep == 0:
            self._state = new_state
        self._record(pending._replace(ctx=ctx), preds)  # the context with the attention maps
        return Evaluation(
            self._from_space(guided, x, ctx.sigma),
            None if renoise is None or x is None else convert(renoise, self.space, "eps", x, ctx.sigma),
        )

    def _combine(
        self,
        plan: Plan,
        native: Mapping[str, Tensor],
        ctx: GuidanceContext,
        state: Any,
        x: Tensor | None,
        sigma: Tensor,
        xs: Mapping[str, Tensor] | None = None,
    ) -> tuple[dict[str, Tensor], Tensor, Any, Tensor | None]:
        if xs:
            preds = {b.name: self._to_space(native[b.name], b, xs.get(b.name, x), sigma) for b in plan}
        else:
            preds = {b.name: self._to_space(native[b.name], b, x, sigma) for b in plan}
        guided, new_state = self.strategy.step_branches(preds, ctx, state)
        renoise = self.strategy.renoise_prediction(preds, ctx, state) if self._coupled else None
        return preds, guided, new_state, renoise

    # -- conversions -------------------------------------------------------------------------------
    def _to_space(self, pred: Tensor, branch: Branch, x: Tensor | None, sigma: Tensor) -> Tensor:
        src = self._native if branch.model == "main" else self.backend.prediction(branch.model)
        if src == self.space:
            return pred
        if x is None:
            raise ConfigError(
                f"strategy: expected a strategy in the model's space {src!r} (or 'any'/'native'), since this "
                f"backend never shows x_t to convert predictions; got {type(self.strategy).__name__} in "
                f"{self.space!r} space"
            )
        return convert(pred, src, self.space, x, sigma)

    def _from_space(self, guided: Tensor, x: Tensor | None, sigma: Tensor) -> Tensor:
        dst = "x0" if self.output == "x0" else self._native
        if dst == self.space:
            return guided
        if x is None:
            raise ConfigError(f"output: expected {self.space!r} (no x_t to convert with), got {dst!r}")
        return convert(guided, self.space, dst, x, sigma)  # type: ignore[arg-type]

    # -- run bookkeeping -----------------------------------------------------------------------------
    def _enter(self, position: Position, sigma: Tensor) -> None:
        if position.substep == 0:
            if position.step <= self._step:
                self._reset()  # a new run with the same engine: the step went back
            self._step = position.step
        elif position.step != self._step:
            raise GuidekitError(
                f"position: expected a corrector of step {self._step} (its first evaluation came before), got "
                f"step {position.step} substep {position.substep}"
            )
        if position.step not in self._log:
            step_sigma = position.step_sigma if position.step_sigma is not None else float(sigma.reshape(-1)[0])
            nxt = position.sigma_next if position.sigma_next is not None else float("nan")
            self._log[position.step] = _StepLog(step_sigma, nxt)

    def _record(self, pending: Pending, preds: Mapping[str, Tensor]) -> None:
        ctx, plan = pending.ctx, pending.plan
        log = self._log[ctx.step]
        facts = self._plan_facts(plan)
        self.nfe += facts.rows
        log.nfe = self.nfe
        log.model_called |= bool(plan)
        log.uncond_used |= facts.beyond_cond
        if log.branches != facts.names:
            log.branches = tuple(dict.fromkeys((*log.branches, *facts.names)))
        if ctx.substep == 0 and self.record_scales and "uncond" in preds and "cond" in preds:
            scale = self.strategy.scale_map(preds["cond"], preds["uncond"], ctx)
            if scale is not None:
                scale = scale.detach().float()
                log.scales = (float(scale.mean()), float(scale.min()), float(scale.max()))
                if self.record_scale_maps:
                    log.scale_map = scale.clone()

    def record(self, step: int) -> StepRecord:
        """The :class:`StepRecord` of ``step`` (so far)."""
        if step not in self._log:
            raise ConfigError(f"step: expected one of the evaluated steps {sorted(self._log)}, got {step}")
        log = self._log[step]
        mean, lo, hi = log.scales if log.scales is not None else (None, None, None)
        return StepRecord(
            step,
            log.sigma,
            log.sigma_next,
            log.nfe,
            log.uncond_used,
            log.model_called,
            mean,
            lo,
            hi,
            log.scale_map,
            log.branches,
        )

    @property
    def records(self) -> list[StepRecord]:
        """One :class:`StepRecord` per evaluated step of the current run, in order."""
        return [self.record(i) for i in sorted(self._log)]


def _check_coupling(strategy: GuidanceStrategy) -> None:
    """Refuse a wrapper that holds a sampler-coupled strategy (CFG++) without being coupled itself: its
    re-noising would be silently lost. :class:`~guidekit.strategies.base.Combinator` subclasses delegate."""
    for child in nested_strategies(strategy):
        if child.sampler_coupled and not strategy.sampler_coupled:
            raise ConfigError(
                f"strategy: expected {type(strategy).__name__} to be sampler-coupled and forward "
                f"renoise_prediction (subclass Combinator), since it wraps the sampler-coupled "
                f"{type(child).__name__}; got a wrapper without it (its re-noising would be silently lost)"
            )
        _check_coupling(child)


def groups(plan: Plan) -> dict[tuple[str, Perturbation | None, bool], list[Branch]]:
    """The plan's branches grouped by ``(model, perturbation, grad)``, in order of first appearance."""
    out: dict[tuple[str, Perturbation | None, bool], list[Branch]] = {}
    for branch in plan:
        out.setdefault(branch.group, []).append(branch)
    return out


def detach_tree(obj: Any) -> Any:
    """``obj`` with every tensor detached: tensors, tuples (named too), lists, dicts and dataclasses."""
    if isinstance(obj, Tensor):
        return obj.detach()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: detach_tree(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **fields)
    if isinstance(obj, tuple):
        items = [detach_tree(v) for v in obj]
        return obj._make(items) if hasattr(obj, "_make") else tuple(items)
    if isinstance(obj, list):
        return [detach_tree(v) for v in obj]
    if isinstance(obj, dict):
        return {k: detach_tree(v) for k, v in obj.items()}
    return obj


def _placeholder(sigma: Tensor) -> Tensor:
    """A ``(b, 1, 1, 1)`` tensor to plan a first evaluation against when no sample is visible yet."""
    return sigma.reshape(-1, 1, 1, 1)
