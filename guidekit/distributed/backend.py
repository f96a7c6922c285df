"""Branch-parallel guidance: a backend that spreads each evaluation's rows over ``torch.distributed`` ranks.

:class:`DistributedBackend` wraps any :class:`~guidekit.engine.Backend`. For each evaluation's plan (all
its forward groups, :meth:`~guidekit.engine.Backend.forward_plan`), every rank evaluates its share of the
``branches x batch`` rows through the inner backend (:mod:`guidekit.distributed.placement`) and one
``all_gather`` gives every rank all the predictions, so the
strategy, the state and the sampler run identically on every rank. The first forward checks, in one small
collective, that all ranks run the same thing (strategy, plan, shapes, noise, conditions). A rank whose
forward raises still joins the gather (with a status flag), so every rank stops instead of waiting.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..branch import Branch, Perturbation
from ..engine import Backend
from ..errors import ConfigError, GuidekitError, ShapeError
from ..ops.spaces import PredictionSpace
from .placement import Call, calls, row_range

__all__ = ["DistributedBackend", "slice_cond"]

_FIELDS = ("strategy", "backend", "plan", "shape", "x", "sigma", "conditions")
_HINTS = {
    "strategy": "build the same strategy with the same parameters on every rank",
    "x": "the starting noise differs: seed every rank the same",
    "sigma": "the schedules differ",
    "conditions": "the conditions (prompts, labels) differ",
    "shape": "the sample shapes or dtypes differ",
}


class DistributedBackend(Backend):
    """Runs ``inner``'s forwards branch-parallel over the ranks of ``group``; every rank gets every prediction.

    Args:
        inner: the backend that runs the network on each rank (a :class:`~guidekit.engine.NativeBackend`,
            ...). It must accept any sub-batch of ``x`` with the conditions sliced along their batch dim.
        group: the process group (``None``: the default group of ``torch.distributed.init_process_group``).
        strategy: a description of the run's strategy (its ``repr``) for the first-forward agreement check.

    Attributes:
        rows: rows this rank evaluated (over all forwards); ``gathered_bytes``: bytes it received.
    """

    def __init__(self, inner: Backend, group: Any = None, *, strategy: str = "") -> None:
        if not isinstance(inner, Backend):
            raise ConfigError(f"inner: expected a guidekit Backend, got {type(inner).__name__}")
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError(
                "group: expected an initialised torch.distributed process group (launch with torchrun or "
                "accelerate launch, then torch.distributed.init_process_group), got none"
            )
        self.inner, self.group, self.strategy = inner, group, strategy
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.rows = 0
        self.gathered_bytes = 0
        self._checked = False
        self._row: tuple[tuple[int, ...], torch.dtype] | None = None  # a prediction row's shape and dtype
        self._slices: dict[tuple[int, int, int], tuple[Mapping[str, Any], Mapping[str, Any]]] = {}

    # -- the Backend protocol, delegated -------------------------------------------------------------
    def models(self) -> frozenset[str]:
        return self.inner.models()

    def prediction(self, model: str) -> PredictionSpace:
        return self.inner.prediction(model)

    def supports(self, perturbation: Perturbation | None) -> bool:
        return self.inner.supports(perturbation)

    def check_branch(self, branch: Branch) -> None:
        self.inner.check_branch(branch)
        if branch.observe is not None and self.world > 1:
            raise ConfigError(
                f"branches: attention maps (branch {branch.name!r} observes {list(branch.observe.layers)}) are "
                f"not gathered across ranks; expected a strategy without observers (SAG, S-CFG) on "
                f"{self.world} ranks, or one rank"
            )

    def forward(
        self, x: Tensor, sigma: Tensor, branches: Sequence[Branch], conditions: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        return self.forward_plan(x, sigma, [branches], conditions)

    def forward_plan(
        self, x: Tensor, sigma: Tensor, groups: Sequence[Sequence[Branch]], conditions: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        """The whole plan's rows (every group's) spread over the ranks, then one all-gather."""
        flat = [branch for group in groups for branch in group]
        if not self._checked:
            self._check_agreement(x, sigma, groups, conditions)
            self._checked = True
        if self.world == 1:
            self.rows += len(flat) * x.shape[0]
            return self.inner.forward_plan(x, sigma, groups, conditions)
        b, k = x.shape[0], len(flat)
        try:
            local, failure = self._local(x, sigma, groups, conditions), None
            self._row = (tuple(local.shape[1:]), local.dtype)
        except Exception as exc:  # still join the gather, so the other ranks stop instead of waiting forever
            shape, dtype = self._row or (tuple(x.shape[1:]), x.dtype)
            local, failure = x.new_zeros(-(-k * b // self.world), *shape, dtype=dtype), exc
        return self._gather(local, failure, flat, b, k)

    # -- this rank's rows and the gather ------------------------------------------------------------
    def _local(
        self, x: Tensor, sigma: Tensor, groups: Sequence[Sequence[Branch]], conditions: Mapping[str, Any]
    ) -> Tensor:
        """This rank's rows in row order, padded to the largest share (an idle rank evaluates a dummy row)."""
        flat = [branch for group in groups for branch in group]
        group_of = [g for g, group in enumerate(groups) for _ in group]
        b, k = x.shape[0], len(flat)
        mine = calls(self.rank, self.world, k, b, group_of) or (Call((0,), 0, 1),)  # idle: one dummy row
        parts: list[Tensor] = []
        for call in mine:
            sub = [flat[i] for i in call.branches]
            conds = self._sliced(conditions, call.lo, call.hi, b)
            out = self.inner.forward(x[call.lo : call.hi], sigma[call.lo : call.hi], sub, conds)
            for br in sub:
                if out[br.name].shape[0] != call.hi - call.lo:
                    raise ShapeError(
                        f"inner: expected {type(self.inner).__name__} to predict the {call.hi - call.lo} samples "
                        f"it is given for branch {br.name!r}, got {out[br.name].shape[0]} (a distributed backend "
                        "needs an inner backend that evaluates the x it is handed, such as NativeBackend)"
                    )
                parts.append(out[br.name])
        local = torch.cat(parts) if len(parts) > 1 else parts[0]
        start, stop = row_range(self.rank, self.world, k * b)
        self.rows += stop - start
        if stop == start:
            local = local[:0]
        share = -(-k * b // self.world)
        if local.shape[0] < share:
            local = torch.cat([local, local.new_zeros(share - local.shape[0], *local.shape[1:])])
        return local.contiguous()

    def _gather(
        self, local: Tensor, failure: Exception | None, branches: Sequence[Branch], b: int, k: int
    ) -> dict[str, Tensor]:
        """One all-gather of every rank's rows plus a status element (1: this rank's forward failed)."""
        packed = torch.cat([local.reshape(-1), local.new_full((1,), float(failure is not None))])
        received = [torch.empty_like(packed) for _ in range(self.world)]
        dist.all_gather(received, packed, group=self.group)
        self.gathered_bytes += packed.numel() * packed.element_size() * (self.world - 1)
        failed = [r for r, part in enumerate(received) if part[-1].item() != 0]
        if failure is not None:
            raise failure
        if failed:
            raise GuidekitError(
                f"distributed: expected every rank's forward to succeed, got a failure on rank(s) {failed} (its "
                f"own error says why); rank {self.rank} stops too instead of waiting for it"
            )
        shares = (row_range(r, self.world, k * b) for r in range(self.world))
        rows = [
            part[:-1].view(local.shape)[: stop - start] for part, (start, stop) in zip(received, shares, strict=True)
        ]
        every = torch.cat(rows)
        return {br.name: every[i * b : (i + 1) * b] for i, br in enumerate(branches)}

    def _sliced(self, conditions: Mapping[str, Any], lo: int, hi: int, batch: int) -> Mapping[str, Any]:
        """``conditions`` restricted to samples ``[lo, hi)``, built once per run and range."""
        if (lo, hi) == (0, batch):
            return conditions
        key = (lo, hi, batch)
        hit = self._slices.get(key)
        if hit is None or hit[0] is not conditions:
            hit = (conditions, {name: slice_cond(value, lo, hi, batch) for name, value in conditions.items()})
            self._slices[key] = hit
        return hit[1]

    # -- the agreement check ------------------------------------------------------------------------
    def _check_agreement(
        self, x: Tensor, sigma: Tensor, groups: Sequence[Sequence[Branch]], conditions: Mapping[str, Any]
    ) -> None:
        """One all-gather of a few 64-bit digests; every rank raises, naming the fields that differ."""
        inner = self.inner
        mine = {
            "strategy": self.strategy,
            "backend": f"{type(inner).__name__}{[(m, inner.prediction(m)) for m in sorted(inner.models())]}",
            "plan": repr([tuple(group) for group in groups]),
            "shape": f"{tuple(x.shape)} {x.dtype}",
            "x": _digest_tensor(x),
            "sigma": _digest_tensor(sigma),
            "conditions": _describe(conditions),
        }
        codes = torch.tensor([_code(mine[f]) for f in _FIELDS], dtype=torch.int64, device=x.device)
        table = [torch.empty_like(codes) for _ in range(self.world)]
        dist.all_gather(table, codes, group=self.group)
        differ = {f: [r for r in range(1, self.world) if table[r][i] != table[0][i]] for i, f in enumerate(_FIELDS)}
        differ = {f: ranks for f, ranks in differ.items() if ranks}
        if differ:
            what = "; ".join(
                f"{f} on ranks {ranks}" + (f" ({_HINTS[f]})" if f in _HINTS else "") for f, ranks in differ.items()
            )
            here = ", ".join(f"{f}={_short(mine[f])}" for f in differ)
            raise ConfigError(
                f"distributed: expected every rank to run the same guided evaluation as rank 0, got a difference "
                f"in {what}; rank {self.rank} of {self.world} has {here}"
            )


def slice_cond(cond: Any, lo: int, hi: int, batch: int) -> Any:
    """A (nested) condition restricted to samples ``[lo, hi)``: tensors with ``batch`` rows are sliced,
    batch-1 and 0-d tensors and non-tensor leaves are kept (the inner backend expands them)."""
    if isinstance(cond, Tensor):
        return cond[lo:hi] if cond.ndim > 0 and cond.shape[0] == batch else cond
    if isinstance(cond, Mapping):
        return type(cond)({k: slice_cond(v, lo, hi, batch) for k, v in cond.items()})  # type: ignore[call-arg]
    if isinstance(cond, tuple | list):
        return type(cond)(slice_cond(v, lo, hi, batch) for v in cond)
    return cond


def _digest_tensor(t: Tensor) -> str:
    data = t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return f"{tuple(t.shape)} {t.dtype} {hashlib.blake2b(data, digest_size=8).hexdigest()}"


def _describe(value: Any) -> str:
    """A process-independent description of a (nested) condition: tensor digests, plain values by repr."""
    if isinstance(value, Tensor):
        return _digest_tensor(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {_describe(value[k])}" for k in sorted(value, key=str)) + "}"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_describe(v) for v in value) + "]"
    if value is None or isinstance(value, str | int | float | bool):
        return repr(value)
    return type(value).__name__


def _code(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
