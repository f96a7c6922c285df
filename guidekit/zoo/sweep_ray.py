"""A sweep's cells as Ray tasks (``guidekit sweep SPEC --ray [ADDRESS]``), for users already on a Ray cluster.

The grid, the cell files and the merge are those of :mod:`guidekit.zoo.sweep`; only who runs the cells
changes. The driver submits one task per unfinished cell; each task builds the bench once per worker
process, runs the cell with :func:`~guidekit.zoo.sweep.run_cell` and writes its file atomically into
``OUT/cells`` (so ``OUT`` must be on storage every node sees). A restarted driver skips finished cells,
exactly as under ``torchrun``. Needs the ``ray`` extra (``pip install "guidekit[ray]"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .compare import Bench
from .sweep import Grid, bench_for, clear_stale, missing, run_cell

__all__ = ["run_cells_ray"]

_BENCHES: dict[str, Bench] = {}
"""One bench per model and worker process (building one loads the model and its references)."""

WRITER = "ray"
"""The temporary-file tag of Ray tasks (a restarted driver removes what killed tasks left)."""


def _run_one(grid: Grid, index: int, out: str, threads: int) -> str:
    """A Ray task: cell ``index`` of ``grid`` into ``out``; returns its key."""
    torch.set_num_threads(threads)
    bench = _BENCHES.get(grid.model)
    if bench is None:
        bench = _BENCHES[grid.model] = bench_for(grid.model)
    cell = grid.cells()[index]
    run_cell(bench, grid, cell, Path(out), WRITER)
    return cell.key


def run_cells_ray(
    grid: Grid, out: Path, address: str | None = None, threads: int = 1, progress: bool = True
) -> tuple[int, int]:
    """Run the grid's unfinished cells as Ray tasks (``address``: a cluster, ``None``: ``RAY_ADDRESS`` or a
    local instance); return ``(cells computed, cells of the grid)``."""
    try:
        import ray
    except ImportError:
        raise ConfigError('--ray: expected the ray package (pip install "guidekit[ray]"), got none installed') from None
    from tqdm.auto import tqdm

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        clear_stale(out, WRITER)
        left = {c.key for c in missing(grid, out)}
        todo = [i for i, c in enumerate(grid.cells()) if c.key in left]
        task: Any = ray.remote(num_cpus=threads)(_run_one)
        pending = [task.remote(grid, i, str(out), threads) for i in todo]
        total = len(grid.cells())
        with tqdm(total=total, initial=total - len(todo), desc="ray", disable=not progress, unit="cell") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)  # a failed cell raises here, naming its error
                bar.update(len(done))
        return len(todo), total
    finally:
        if started:
            ray.shutdown()
