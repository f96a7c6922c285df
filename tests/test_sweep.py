"""``guidekit sweep``: a grid sharded over ranks, one atomic file per cell, resumable, merged like compare.

One grid (2 strategies x 2 scales x 4 seeds = 16 cells, digits model, 4 DDIM steps, 1 sample per class):

* ``guidekit compare`` on the same strategies and seeds gives the reference table;
* a one-process sweep is killed (SIGKILL) after its first cells, then restarted: it finishes without
  rewriting the finished cells (same inode and mtime), every cell file loads, no temporary file is left,
  and its merged table equals compare's;
* the same sweep on 2 processes launched by ``torchrun`` merges into the same table.

Tables are compared on every column but ``seconds`` (wall time).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import guidekit as gk
from guidekit.cli import main, parse_strategy
from guidekit.zoo.sweep import Grid, load_sweep, merge, with_scale, world_position

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

SPEC = {
    "model": "digits",
    "strategies": ["cfg", {"name": "apg", "params": {"eta": 0.0, "norm_threshold": 2.5}}],
    "scales": [1.5, 3.0],
    "seeds": [0, 1, 2, 3],
    "sampler": "ddim",
    "steps": 4,
    "per_class": 1,
}
COMPARE = [
    *("-s", "cfg:scale=1.5", "-s", "cfg:scale=3"),
    *("-s", "apg:scale=1.5,eta=0,norm_threshold=2.5", "-s", "apg:scale=3,eta=0,norm_threshold=2.5"),
    *("--steps", "4", "--per-class", "1", "--seeds", "0", "1", "2", "3"),
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}


def table(folder: Path) -> list[dict[str, str]]:
    with (folder / "metrics.csv").open() as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


def cells(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (folder / "cells").glob("*.pt")}


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sweep") / "grid.json"
    path.write_text(json.dumps(SPEC))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    out = tmp_path_factory.mktemp("compare")
    assert main(["compare", *COMPARE, "--out", str(out), "-q"]) == 0
    return table(out)


def test_a_killed_sweep_resumes_without_recomputing_and_merges_to_compares_table(
    spec: Path, reference: list[dict[str, str]], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "guidekit.cli", "sweep", str(spec), "--out", str(out), "-q"]
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "cells").exists() and cells(out)):
            assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    finished = cells(out)
    assert 1 <= len(finished) < 16, finished
    for name in finished:  # every file under a final name is a whole cell
        assert set(torch.load(out / "cells" / name, weights_only=False)) >= {"metrics", "samples", "seed"}
    (out / "cells" / ".half-written.pt.tmp-r0").write_bytes(b"\0" * 10)  # what a kill mid-write leaves

    assert main(["sweep", str(spec), "--out", str(out), "-q"]) == 0
    after = cells(out)
    assert len(after) == 16 and {k: after[k] for k in finished} == finished  # finished cells not recomputed
    assert not list((out / "cells").glob(".*")), "a temporary file was left"
    assert table(out) == reference


def test_two_processes_merge_into_the_same_table(spec: Path, reference: list[dict[str, str]], tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
              f"--master-port={port}", "-m", "guidekit.cli"]  # fmt: skip
    done = subprocess.run(
        [*launch, "sweep", str(spec), "--out", str(tmp_path), "-q"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert len(cells(tmp_path)) == 16
    assert table(tmp_path) == reference


def test_ray_tasks_run_the_same_cells(spec: Path, reference: list[dict[str, str]], tmp_path: Path) -> None:
    pytest.importorskip("ray")
    command = [sys.executable, "-m", "guidekit.cli", "sweep", str(spec), "--out", str(tmp_path), "--ray", "-q"]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert len(cells(tmp_path)) == 16 and not list((tmp_path / "cells").glob(".*"))
    assert table(tmp_path) == reference


# -- the parts ---------------------------------------------------------------------------------------------
def test_sweep_file_errors_name_the_file_and_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**SPEC, "seed": [0]}))
    with pytest.raises(gk.ConfigError, match=r"sweep file .*bad\.json.*seed: Extra inputs are not permitted"):
        load_sweep(bad, parse_strategy)
    bad.write_text(json.dumps({**SPEC, "seeds": [0, 0]}))
    with pytest.raises(gk.ConfigError, match=r"seeds: expected each seed once, got \[0, 0\]"):
        load_sweep(bad, parse_strategy)
    bad.write_text(json.dumps({**SPEC, "strategies": ["samg"], "scales": [2.0]}))
    with pytest.raises(gk.ConfigError, match=r"scales: expected strategies with a 'scale' field .* got SAMG"):
        load_sweep(bad, parse_strategy)
    toml = tmp_path / "grid.toml"
    toml.write_text('strategies = ["cfg:scale=2"]\nseeds = [0, 1]\nsteps = 4\n')
    grid = load_sweep(toml, parse_strategy)
    assert [c.entry.label for c in grid.cells()] == ["cfg scale=2"] * 2 and len({c.key for c in grid.cells()}) == 2


def test_merge_only_on_an_unfinished_grid_names_the_missing_cells(
    spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sweep", str(spec), "--out", str(tmp_path), "--merge-only", "-q"]) == 2
    err = capsys.readouterr().err
    assert "sweep: expected all 16 cells" in err and "got 16 missing (cfg scale=1.5 seed 0" in err, err
    assert "run the same command again" in err


def test_scale_goes_to_the_strategy_or_its_inner_one() -> None:
    assert with_scale(gk.CFG(2.0), 4.0) == gk.CFG(4.0)
    assert with_scale(gk.Interval(gk.CFG(2.0), 0.5, 5.0), 4.0) == gk.Interval(gk.CFG(4.0), 0.5, 5.0)


def test_rank_and_world_come_from_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert world_position() == (1, 3)
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(gk.ConfigError, match="RANK: expected 0 <= RANK < WORLD_SIZE = 3, got 3"):
        world_position()


def test_merging_an_unfinished_grid_says_what_is_missing(spec: Path, tmp_path: Path) -> None:
    grid: Grid = load_sweep(spec, parse_strategy)
    with pytest.raises(gk.ConfigError, match=r"expected all 16 cells in .*, got 16 missing \(cfg scale=1.5 seed 0"):
        merge(None, grid, tmp_path)  # type: ignore[arg-type]
