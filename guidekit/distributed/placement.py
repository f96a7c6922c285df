"""Where the rows of one evaluation go: a pure, rank-independent split of ``branches x batch`` over ranks.

The ``k`` branches of an evaluation's plan (all its forward groups, in order) on a batch of ``b`` samples
are ``k * b`` rows in the order the single-process backend batches them (``[branch 0's samples; branch
1's samples; ...]``). Rank ``r`` of ``W`` evaluates the contiguous rows ``[r * N // W, (r + 1) * N // W)``
with ``N = k * b``, so

* two branches on two ranks (three on three) put one whole branch on each rank;
* three branches on two ranks give each rank 1.5 branches' worth of rows;
* one branch (Interval outside its window, Adaptive Guidance after its switch) splits the batch;
* two groups (AutoGuidance's main and weak model, a perturbed forward beside CFG) run side by side.

A rank's rows become one call of the inner backend per run of branches sharing a sample range (a
:class:`Call`). Every rank computes every rank's placement, so no rank needs to be told where rows live.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Call", "calls", "row_range"]


@dataclass(frozen=True)
class Call:
    """One call of the inner backend: ``branches`` (indices into the group) on samples ``[lo, hi)``."""

    branches: tuple[int, ...]
    lo: int
    hi: int

    @property
    def rows(self) -> int:
        return len(self.branches) * (self.hi - self.lo)


def row_range(rank: int, world: int, rows: int) -> tuple[int, int]:
    """The contiguous rows ``[start, stop)`` of ``rows`` that ``rank`` of ``world`` evaluates (balanced)."""
    return rank * rows // world, (rank + 1) * rows // world


def calls(rank: int, world: int, branches: int, batch: int, group_of: Sequence[int] | None = None) -> tuple[Call, ...]:
    """The inner-backend calls of ``rank`` for ``branches`` branches on ``batch`` samples, in row order.

    ``group_of[i]`` is the forward group of branch ``i`` (all one group when ``None``): a plan's groups are
    placed side by side, so AutoGuidance's main and weak forwards run on different ranks at once.
    Consecutive branches of one group covering the same sample range are merged into one call (one
    batched forward). A rank with no rows (``branches * batch < world``) gets no call.
    """
    start, stop = row_range(rank, world, branches * batch)
    group = list(group_of) if group_of is not None else [0] * branches
    out: list[Call] = []
    for i in range(branches):
        lo, hi = max(start, i * batch) - i * batch, min(stop, (i + 1) * batch) - i * batch
        if lo >= hi:
            continue
        last = out[-1] if out else None
        if last is not None and (last.lo, last.hi) == (lo, hi) and group[last.branches[-1]] == group[i]:
            out[-1] = Call((*last.branches, i), lo, hi)
        else:
            out.append(Call((i,), lo, hi))
    return tuple(out)
