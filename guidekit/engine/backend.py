"""Backends: what runs the network for the engine, behind one small interface.

A backend answers ``forward(x, sigma, branches, conditions) -> {branch name: prediction}`` for branches that
share ``(model, perturbation)``, in one batched call, in the model's native prediction space. It says which
models it has (:meth:`Backend.models`), what each predicts (:meth:`Backend.prediction`) and which kinds of
:class:`~guidekit.branch.Perturbation` it can apply (:attr:`Backend.perturbations`). Backends are adapters
at the edge: :class:`NativeBackend` here (any ``model(x, t, cond)`` through a guidekit adapter); the
diffusers pipeline and modular-guider backends live in :mod:`guidekit.integrations.diffusers`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..branch import AttentionMaps, Branch, NoPerturbation, Perturbation, observation_key
from ..errors import ConfigError, ShapeError
from ..ops.spaces import PredictionSpace
from ..samplers.adapters import ModelAdapter
from .observe import observed
from .perturb import KINDS as PERTURBATION_KINDS
from .perturb import applied

__all__ = ["Backend", "NativeBackend", "batch_cond", "concat_cond"]


class Backend(ABC):
    """Runs the network for the engine: one batched forward per group of branches."""

    perturbations: ClassVar[frozenset[str]] = frozenset({NoPerturbation.kind})
    """The :attr:`Perturbation.kind` names this backend can apply (``"none"`` always)."""

    @abstractmethod
    def models(self) -> frozenset[str]:
        """The model names branches may use (``"main"``, and ``"weak"`` where a weak model is given)."""

    @abstractmethod
    def prediction(self, model: str) -> PredictionSpace:
        """The native prediction space of ``model``'s output."""

    @abstractmethod
    def forward(
        self, x: Tensor, sigma: Tensor, branches: Sequence[Branch], conditions: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        """Evaluate ``branches`` (one ``model`` and ``perturbation``) on EDM ``(x, sigma)`` in one batched call.

        Returns ``{branch.name: prediction}`` in ``prediction(model)`` space, each ``(b, c, *spatial)``.
        """

    def forward_plan(
        self, x: Tensor, sigma: Tensor, groups: Sequence[Sequence[Branch]], conditions: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        """All of one evaluation's groups: :meth:`forward` once per group, in order. A backend that runs the
        groups side by side (:class:`guidekit.distributed.DistributedBackend`: on different ranks) overrides it.
        """
        preds: dict[str, Tensor] = {}
        for branches in groups:
            preds.update(self.forward(x, sigma, branches, conditions))
        return preds

    def supports(self, perturbation: Perturbation | None) -> bool:
        """Whether this backend can apply ``perturbation`` (``None`` is the plain forward)."""
        return perturbation is None or perturbation.kind in self.perturbations

    def check_branch(self, branch: Branch) -> None:
        """Refuse a branch this backend cannot evaluate, naming what it supports."""
        if branch.model not in self.models():
            raise ConfigError(
                f"branches: expected a model in {sorted(self.models())} for branch {branch.name!r}, got "
                f"{branch.model!r}" + (" (pass weak_model=...)" if branch.model == "weak" else "")
            )
        if not self.supports(branch.perturbation):
            kind = branch.perturbation.kind if branch.perturbation is not None else "none"
            raise ConfigError(
                f"perturbation: {type(self).__name__} supports {sorted(self.perturbations)}, got {kind!r} for "
                f"branch {branch.name!r}"
            )


class NativeBackend(Backend):
    """Native models through guidekit adapters (:class:`~guidekit.samplers.VPModel`, ``FlowModel``, ...).

    Branches of one group are batched as ``[x; x; ...]`` with their conditions concatenated leaf by leaf
    (``[cond; uncond]`` for CFG), one call of the model. A group's perturbation
    (:mod:`guidekit.perturbations`) is applied to the model (an ``nn.Module``) for that call
    (:mod:`guidekit.engine.perturb`).
    """

    perturbations: ClassVar[frozenset[str]] = frozenset({NoPerturbation.kind}) | PERTURBATION_KINDS

    def __init__(self, models: Mapping[str, ModelAdapter], *, allow_nonfinite: bool = False) -> None:
        if "main" not in models:
            raise ConfigError(f"models: expected a 'main' model, got {sorted(models)}")
        for name, model in models.items():
            if not isinstance(model, ModelAdapter):
                raise ConfigError(
                    f"{'model' if name == 'main' else name + '_model'}: expected a guidekit adapter (VPModel, "
                    f"FlowModel, EDMModel), got {type(model).__name__}"
                )
        self._models = dict(models)
        self._names = frozenset(self._models)
        self.allow_nonfinite = allow_nonfinite
        self._cache: dict[tuple[tuple[str, ...], int], tuple[Mapping[str, Any], Any]] = {}
        self._last: tuple[Sequence[Branch], Mapping[str, Any], int, Any] | None = None

    def models(self) -> frozenset[str]:
        return self._names

    def prediction(self, model: str) -> PredictionSpace:
        return self._models[model].prediction

    def adapter(self, model: str = "main") -> ModelAdapter:
        """The adapter of ``model``."""
        return self._models[model]

    def forward(
        self, x: Tensor, sigma: Tensor, branches: Sequence[Branch], conditions: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        model = self._models[branches[0].model]
        batched = self._batched(conditions, branches, x.shape[0])
        kw = {"allow_nonfinite": self.allow_nonfinite}
        perturbation = branches[0].group[1]
        specs = list(dict.fromkeys(b.observe for b in branches if b.observe is not None))
        if specs:
            return self._observing(specs, model, x, sigma, branches, conditions)
        if perturbation is None:
            return self._predict(model, x, sigma, branches, batched, kw)
        extra = perturbation.conditions()
        if extra:
            return self._predict_with(model, x, sigma, branches, batched, extra, conditions, kw)
        with applied(model.model, perturbation):
            return self._predict(model, x, sigma, branches, batched, kw)

    def _predict_with(
        self,
        model: ModelAdapter,
        x: Tensor,
        sigma: Tensor,
        branches: Sequence[Branch],
        batched: Any,
        extra: tuple[str, ...],
        conditions: Mapping[str, Any],
        kw: dict[str, Any],
    ) -> dict[str, Tensor]:
        """A perturbation that carries conditions of its own (NAG's negative context): one call on
        ``[branch rows; rows of each extra condition, once per branch]``, the branch rows returned."""
        k, b = len(branches), x.shape[0]
        both = batched
        for name in extra:
            carried = Branch(name, condition=name)
            cond = _condition(conditions, carried, b)
            for _ in range(k):
                both = concat_cond(both, cond, name)
        n = k * (1 + len(extra))
        with applied(model.model, branches[0].perturbation, rows=(slice(0, k * b), slice(k * b, n * b))):
            pred = model.predict(torch.cat([x] * n), torch.cat([sigma] * n), both, **kw)
        return dict(zip((br.name for br in branches), pred[: k * b].split(b), strict=True))

    def _observing(
        self,
        specs: list[AttentionMaps],
        model: ModelAdapter,
        x: Tensor,
        sigma: Tensor,
        branches: Sequence[Branch],
        conditions: Mapping[str, Any],
    ) -> dict[str, Tensor]:
        """The group's forward with the attention maps its branches ask for recorded, each branch's rows
        returned beside the predictions (:func:`~guidekit.branch.observation_key`)."""
        plain = [replace(b, observe=None) for b in branches]
        with observed(model.model, specs) as record:
            preds = self.forward(x, sigma, plain, conditions)
        b = x.shape[0]
        for i, branch in enumerate(branches):
            if branch.observe is not None:
                for layer, amap in record[branch.observe].items():
                    preds[observation_key(branch.name, layer)] = amap[i * b : (i + 1) * b]
        return preds

    @staticmethod
    def _predict(
        model: ModelAdapter, x: Tensor, sigma: Tensor, branches: Sequence[Branch], batched: Any, kw: dict[str, Any]
    ) -> dict[str, Tensor]:
        """One call of ``model`` on ``[x; x; ...]`` for the group's branches, split per branch."""
        k, b = len(branches), x.shape[0]
        if k == 1:
            return {branches[0].name: model.predict(x, sigma, batched, **kw)}
        pred = model.predict(torch.cat([x] * k), torch.cat([sigma] * k), batched, **kw)
        return dict(zip((br.name for br in branches), pred.split(b), strict=True))

    def _batched(self, conditions: Mapping[str, Any], branches: Sequence[Branch], batch: int) -> Any:
        """The group's conditions concatenated along the batch, built once per run and group (they do not
        change between evaluations; the cache holds the conditions it was built from)."""
        last = self._last
        if last is not None and last[0] is branches and last[1] is conditions and last[2] == batch:
            return last[3]  # the engine hands the same group list evaluation after evaluation
        key = (tuple(b.condition for b in branches), batch)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is conditions:
            both = hit[1]
        else:
            conds = [_condition(conditions, br, batch) for br in branches]
            both = conds[0]
            for br, cond in zip(branches[1:], conds[1:], strict=True):
                both = concat_cond(both, cond, br.condition)
            self._cache[key] = (conditions, both)
        self._last = (branches, conditions, batch, both)
        return both


def _condition(conditions: Mapping[str, Any], branch: Branch, batch: int) -> Any:
    if branch.condition not in conditions:
        raise ConfigError(
            f"conditions: expected a condition named {branch.condition!r} for branch {branch.name!r}, got "
            f"{sorted(conditions)}"
        )
    value = conditions[branch.condition]
    if value is None and branch.condition != "cond":
        what = "unconditional" if branch.condition == "uncond" else repr(branch.condition)
        raise ConfigError(
            f"{branch.condition}: expected the {what} condition, since the strategy evaluates branch "
            f"{branch.name!r} at this step; got None"
        )
    return batch_cond(value, batch, branch.condition)


def batch_cond(cond: Any, batch: int, name: str = "cond") -> Any:
    """Check a (nested) condition has batch ``batch`` in every tensor's first dim; expand batch-1 tensors."""
    if isinstance(cond, Tensor):
        if cond.ndim == 0 or cond.shape[0] == batch:
            return cond
        if cond.shape[0] == 1:
            return cond.expand(batch, *cond.shape[1:])
        raise ShapeError(f"{name}: expected batch size {batch} (or 1) in the first dim, got shape {tuple(cond.shape)}")
    if isinstance(cond, Mapping):
        return type(cond)({k: batch_cond(v, batch, f"{name}[{k!r}]") for k, v in cond.items()})  # type: ignore[call-arg]
    if isinstance(cond, tuple | list):
        return type(cond)(batch_cond(v, batch, f"{name}[{i}]") for i, v in enumerate(cond))
    return cond


def concat_cond(cond: Any, other: Any, name: str = "uncond") -> Any:
    """``[cond; other]`` along the batch, leaf by leaf; non-tensor leaves must be equal."""
    if isinstance(cond, Tensor) and isinstance(other, Tensor):
        if cond.ndim == 0 or cond.shape[1:] != other.shape[1:]:
            raise ShapeError(f"{name}: expected the shape of cond {tuple(cond.shape)}, got {tuple(other.shape)}")
        return torch.cat([cond, other.to(device=cond.device, dtype=cond.dtype)])
    if isinstance(cond, Mapping) and isinstance(other, Mapping):
        if set(cond) != set(other):
            raise ConfigError(f"{name}: expected the keys of cond {sorted(cond)}, got {sorted(other)}")
        return type(cond)({k: concat_cond(cond[k], other[k], f"{name}[{k!r}]") for k in cond})  # type: ignore[call-arg]
    if isinstance(cond, tuple | list) and isinstance(other, tuple | list) and len(cond) == len(other):
        return type(cond)(concat_cond(a, b, f"{name}[{i}]") for i, (a, b) in enumerate(zip(cond, other, strict=True)))
    if type(cond) is type(other) and not isinstance(cond, Tensor) and cond == other:
        return cond
    raise ShapeError(f"{name}: expected the same structure as cond ({type(cond).__name__}), got {type(other).__name__}")
