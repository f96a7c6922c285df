"""Sharded, resumable strategy sweeps (``guidekit sweep SPEC``): a grid of cells over the ranks of a job.

A sweep file (JSON or TOML) names a grid: strategies x scales x seeds on an embedded model, with one
sampler setting for all (so the cells are comparable, as in ``guidekit compare``)::

    {"model": "digits", "strategies": ["cfg", "apg:norm_threshold=2.5"], "scales": [1.5, 3.0],
     "seeds": [0, 1, 2], "sampler": "ddim", "steps": 12, "per_class": 10}

One cell is one strategy at one seed. Rank ``r`` of ``W`` (``torchrun``/``accelerate launch`` set ``RANK``
and ``WORLD_SIZE``; no process group is needed) runs the cells ``r, r + W, ...``. Each finished cell is one
file ``OUT/cells/<key>.pt``, written under a temporary name and renamed, so a killed rank leaves either a
whole cell or none; a restarted sweep skips the cells whose file exists. The key hashes the model, the
setting, the strategy's spec and the seed, so a changed grid reuses exactly the cells it shares. Rank 0
then merges the cells into the outputs of ``guidekit compare`` (``metrics.txt/.csv/.json``, grid, frontier).
:mod:`guidekit.zoo.sweep_ray` runs the same cells as Ray tasks instead (``--ray``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import ConfigError
from ..strategies.base import GuidanceStrategy
from .cmdline import seeds
from .compare import Bench, Run, Settings
from .report import Comparison, Entry, _spec

__all__ = [
    "Cell",
    "Grid",
    "SweepSpec",
    "bench_for",
    "clear_stale",
    "describe_missing",
    "load_sweep",
    "merge",
    "missing",
    "run_cell",
    "run_cells",
    "wait_for",
    "with_scale",
    "world_position",
]

CELLS = "cells"


class SweepSpec(BaseModel):
    """The sweep file: strategies (``"cfg:scale=2"`` strings or ``{"name": ..., "params": ...}`` specs),
    optional ``scales`` applied to each (its ``scale`` field, or its inner strategy's), seeds and setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "digits"
    strategies: list[str | dict[str, Any]]
    scales: list[float] = []
    seeds: list[int] = [0]
    sampler: str = "ddim"
    steps: int = 20
    per_class: int = 10
    schedule: str = "trailing"


@dataclass(frozen=True)
class Cell:
    """One strategy (``entry``, the ``index``-th of the grid) at one ``seed``; ``key`` names its file."""

    index: int
    entry: Entry
    seed: int
    key: str


@dataclass(frozen=True)
class Grid:
    """The cells of a sweep, in a fixed order (strategy-major, then seed)."""

    model: str
    entries: tuple[Entry, ...]
    seeds: tuple[int, ...]
    settings: Settings

    def cells(self) -> list[Cell]:
        return [Cell(i, e, s, self.key(e, s)) for i, e in enumerate(self.entries) for s in self.seeds]

    def key(self, entry: Entry, seed: int) -> str:
        what = {"model": self.model, "settings": vars(self.settings), "strategy": _spec(entry.strategy), "seed": seed}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=repr).encode()).hexdigest()[:24]


def load_sweep(path: str | Path, parse: Callable[[str], GuidanceStrategy]) -> Grid:
    """Read a sweep file (``.json`` or ``.toml``); ``parse`` builds a strategy from a string or a spec dict."""
    from ..config import _as_spec, build

    path = Path(path)
    where = f"sweep file {str(path)!r}"
    try:
        text = path.read_text()
        data = _read(text, path.suffix)
        spec = SweepSpec.model_validate(data)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSON/TOML errors and pydantic's ValidationError
        detail = (
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            if isinstance(exc, ValidationError)
            else str(exc)
        )
        raise ConfigError(f"{where}: expected a sweep (strategies, scales, seeds, setting), got {detail}") from None
    if spec.model not in ("digits", "gmm"):
        raise ConfigError(f"{where}: model: expected 'digits' or 'gmm', got {spec.model!r}")
    if not spec.strategies or not spec.seeds:
        raise ConfigError(f"{where}: expected at least one strategy and one seed, got {spec.strategies} x {spec.seeds}")
    seeds(f"{where}: seeds", spec.seeds)
    if len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError(f"{where}: seeds: expected each seed once, got {spec.seeds}")
    made = [parse(s) if isinstance(s, str) else build(_as_spec(s, where), where=where) for s in spec.strategies]
    if spec.scales:
        made = [with_scale(s, scale) for s in made for scale in spec.scales]
    settings = Settings(sampler=spec.sampler, steps=spec.steps, per_class=spec.per_class, schedule=spec.schedule)
    return Grid(spec.model, tuple(Entry.of(s) for s in made), tuple(spec.seeds), settings)


def _read(text: str, suffix: str) -> Any:
    if suffix == ".toml":
        from ..config import tomllib

        return tomllib.loads(text)
    return json.loads(text)


def with_scale(strategy: GuidanceStrategy, scale: float) -> GuidanceStrategy:
    """``strategy`` with its ``scale`` field (or its inner strategy's) set to ``scale``."""
    fields = {f.name for f in dataclasses.fields(strategy)} if dataclasses.is_dataclass(strategy) else set()
    if "scale" in fields:
        return dataclasses.replace(strategy, scale=scale)  # type: ignore[type-var]
    inner = getattr(strategy, "inner", None) if "inner" in fields else None
    if isinstance(inner, GuidanceStrategy):
        return dataclasses.replace(strategy, inner=with_scale(inner, scale))  # type: ignore[type-var]
    raise ConfigError(
        f"scales: expected strategies with a 'scale' field or an inner strategy with one, got "
        f"{type(strategy).__name__} (fields {sorted(fields)}); give its strengths as separate strategies"
    )


def world_position() -> tuple[int, int]:
    """``(rank, world size)``: the process group's if one is initialised, else ``RANK``/``WORLD_SIZE``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(
            f"RANK, WORLD_SIZE: expected integers, got {os.environ.get('RANK')!r}, {os.environ.get('WORLD_SIZE')!r}"
        ) from None
    if not 0 <= rank < world:
        raise ConfigError(f"RANK: expected 0 <= RANK < WORLD_SIZE = {world}, got {rank}")
    return rank, world


def _path(out: Path, cell: Cell) -> Path:
    return out / CELLS / f"{cell.key}.pt"


def missing(grid: Grid, out: Path) -> list[Cell]:
    """The cells of ``grid`` with no finished file in ``out``."""
    return [c for c in grid.cells() if not _path(out, c).exists()]


def bench_for(model: str) -> Bench:
    """The embedded bench a sweep file names (``digits`` or ``gmm``)."""
    from .compare import DigitsBench, GMMBench

    return GMMBench() if model == "gmm" else DigitsBench()


def run_cells(
    bench: Bench, grid: Grid, out: Path, rank: int = 0, world: int = 1, progress: bool = True
) -> tuple[int, int]:
    """Run this rank's unfinished cells, one atomic file each; return ``(cells computed, cells of this rank)``."""
    from tqdm.auto import tqdm

    clear_stale(out, f"r{rank}")
    mine = grid.cells()[rank::world]
    todo = [c for c in mine if not _path(out, c).exists()]
    desc = f"rank {rank}/{world}"
    with tqdm(total=len(mine), initial=len(mine) - len(todo), desc=desc, disable=not progress, unit="cell") as bar:
        for cell in todo:
            bar.set_postfix_str(f"{cell.entry.label} seed={cell.seed}"[:48])
            run_cell(bench, grid, cell, out, f"r{rank}")
            bar.update(1)
    return len(todo), len(mine)


def clear_stale(out: Path, writer: str) -> None:
    """Create ``OUT/cells`` and remove what a killed run of ``writer`` left half written."""
    folder = out / CELLS
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".*.tmp-{writer}"):
        stale.unlink()


def run_cell(bench: Bench, grid: Grid, cell: Cell, out: Path, writer: str) -> None:
    """Sample and measure one cell and write its file atomically (``writer`` names the temporary file)."""
    first = cell.seed == grid.seeds[0]
    run = bench.run(cell.entry.strategy, grid.settings, seed=cell.seed, record_scale_maps=first)
    payload = {
        "key": cell.key,
        "seed": cell.seed,
        "label": cell.entry.label,
        "metrics": run.metrics,
        "samples": run.samples,
        "labels": run.labels,
        "records": run.records if first else [],
    }
    path = _path(out, cell)
    tmp = path.with_name(f".{path.name}.tmp-{writer}")
    with tmp.open("wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def wait_for(grid: Grid, out: Path, timeout: float, progress: bool = False, poll: float = 0.5) -> list[Cell]:
    """Wait up to ``timeout`` seconds for the other ranks' cells (an overall progress bar with ``progress``);
    return those still missing."""
    from tqdm.auto import tqdm

    deadline, total = time.monotonic() + timeout, len(grid.cells())
    left = missing(grid, out)
    with tqdm(total=total, initial=total - len(left), desc="all ranks", disable=not progress, unit="cell") as bar:
        while left and time.monotonic() < deadline:
            time.sleep(poll)
            now = missing(grid, out)
            bar.update(len(left) - len(now))
            left = now
    return left


def describe_missing(grid: Grid, out: Path, left: list[Cell]) -> str:
    """``expected all N cells in OUT/cells, got K missing (the first few)`` for error messages."""
    first = ", ".join(f"{c.entry.label} seed {c.seed}" for c in left[:3])
    return (
        f"expected all {len(grid.cells())} cells in {str(out / CELLS)!r}, got {len(left)} missing "
        f"({first}{', ...' if len(left) > 3 else ''})"
    )


def merge(bench: Bench, grid: Grid, out: Path) -> Comparison:
    """The :class:`Comparison` of all the grid's cells (what ``guidekit compare`` would have computed)."""
    left = missing(grid, out)
    if left:
        raise ConfigError(f"sweep: {describe_missing(grid, out, left)}; run the sweep again to finish them")
    result = Comparison(bench, grid.settings, grid.seeds, list(grid.entries))
    for cell in grid.cells():
        data = torch.load(_path(out, cell), weights_only=False)
        row = {"index": cell.index, "family": cell.entry.family, "strength": cell.entry.strength}
        result.rows.append({**row, "label": cell.entry.label, "seed": cell.seed, **data["metrics"]})
        if cell.seed == grid.seeds[0]:
            strategy = cell.entry.strategy
            result.first_runs.append(
                Run(strategy, cell.seed, data["samples"], data["labels"], data["metrics"], data["records"])
            )
    return result
