"""Branch-parallel guidance (``guidekit.distributed``) equals the single-process engine.

Two ``torchrun`` launches (2 and 3 gloo processes on 127.0.0.1) each run every case of
``distributed_cases.py`` (CFG, APG, Interval(CFG) with and without the unconditional branch, Adaptive
Guidance across its switch, a three-branch plan, AutoGuidance's two groups (main and weak model); euler,
heun, dpmpp-2m, and euler-ancestral with per-sample generators; images and 5D video), and two runs whose
ranks disagree. Against the same cases run in this process:

* ``rowwise`` model (each row evaluated alone, so bitwise batch-independent): **bit-identical**, on every rank.
* ``batched`` model (the Gaussian-mixture oracle as is): its float64 matmuls differ in the last ulp between
  a batch of ``k * b`` rows and a sub-batch (measured: up to 4e-15), so those compare to 1e-12.
* The rows evaluated over all ranks equal the single-process rows (nothing computed twice), each rank
  evaluating about ``1 / W`` of them, and every rank reports the same NFE. A rank left without rows (a
  one-branch step of batch 2 on 3 ranks) evaluates one dummy row, so its gather has a shape and a dtype.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import guidekit as gk
from guidekit.distributed import Call, DistributedBackend, calls, guided, row_range, slice_cond
from guidekit.engine import NativeBackend
from guidekit.samplers import EDMModel

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import distributed_cases as dc  # noqa: E402


# -- placement (pure) ------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("branches", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 2, 3, 5])
def test_every_row_is_placed_once_and_shares_are_balanced(world: int, branches: int, batch: int) -> None:
    seen = []
    for rank in range(world):
        start, stop = row_range(rank, world, branches * batch)
        assert stop - start in (branches * batch // world, -(-branches * batch // world))
        rows = [
            i * batch + s for c in calls(rank, world, branches, batch) for i in c.branches for s in range(c.lo, c.hi)
        ]
        assert rows == list(range(start, stop))
        seen += rows
    assert seen == list(range(branches * batch))


def test_placement_per_plan() -> None:
    assert [calls(r, 2, 2, 4) for r in range(2)] == [(Call((0,), 0, 4),), (Call((1,), 0, 4),)]
    assert [calls(r, 3, 3, 2) for r in range(3)] == [(Call((i,), 0, 2),) for i in range(3)]
    assert calls(0, 2, 3, 2) == (Call((0,), 0, 2), Call((1,), 0, 1))  # 3 branches on 2 ranks: 1.5 each
    assert calls(1, 2, 3, 2) == (Call((1,), 1, 2), Call((2,), 0, 2))
    assert [calls(r, 2, 1, 4) for r in range(2)] == [(Call((0,), 0, 2),), (Call((0,), 2, 4),)]  # batch split
    assert calls(0, 1, 2, 3) == (Call((0, 1), 0, 3),)  # one rank: the single-process batched call
    # two groups (AutoGuidance: main and weak model) side by side, not one after the other
    assert [calls(r, 2, 2, 2, group_of=[0, 1]) for r in range(2)] == [(Call((0,), 0, 2),), (Call((1,), 0, 2),)]
    assert calls(0, 1, 3, 2, group_of=[0, 0, 1]) == (Call((0, 1), 0, 2), Call((2,), 0, 2))  # one call per group


def test_slice_cond_slices_per_sample_leaves_only() -> None:
    cond = {"labels": torch.arange(4), "pooled": torch.ones(1, 3), "scale": torch.tensor(2.0), "name": "x"}
    out = slice_cond(cond, 1, 3, 4)
    assert torch.equal(out["labels"], torch.tensor([1, 2])) and out["pooled"].shape == (1, 3)
    assert out["scale"].ndim == 0 and out["name"] == "x"
    assert slice_cond([torch.arange(4)], 0, 2, 4)[0].tolist() == [0, 1]


def test_without_a_process_group_it_says_how_to_launch() -> None:
    backend = NativeBackend({"main": EDMModel(dc.SHAPES["image"].oracle.as_model("edm"))})
    with pytest.raises(gk.ConfigError, match=r"group: expected an initialised torch\.distributed process group"):
        DistributedBackend(backend)
    with pytest.raises(gk.ConfigError, match="group: expected an initialised"):
        guided(backend.adapter(), gk.CFG(3.0), torch.zeros(1), torch.zeros(1))
    with pytest.raises(gk.ConfigError, match="inner: expected a guidekit Backend, got str"):
        DistributedBackend("native")  # type: ignore[arg-type]


# -- torchrun launches -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}ranks")
def launch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list[Any]]:
    world = request.param
    out = tmp_path_factory.mktemp(f"dist{world}")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-addr=127.0.0.1",
               f"--master-port={_free_port()}", str(HERE / "distributed_cases.py"), str(out)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return world, [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[torch.Tensor, dict[str, int]]]:
    return {name: dc.run_case(name, parallel=False) for name in dc.cases()}


def test_branch_parallel_sampling_equals_the_single_process_engine(
    launch: tuple[int, list[Any]], reference: dict[str, tuple[torch.Tensor, dict[str, int]]]
) -> None:
    _, ranks = launch
    for name, (expected, stats) in reference.items():
        for rank, result in enumerate(ranks):
            got = result["samples"][name]
            if name.endswith("rowwise"):
                assert torch.equal(got, expected), f"{name} rank {rank}: not bit-identical"
            else:
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-12, msg=f"{name} rank {rank}")
            assert result["stats"][name]["nfe"] == stats["nfe"], name
        rows = [result["stats"][name]["rows"] for result in ranks]
        assert sum(rows) == stats["rows"], f"{name}: rows {rows}, single process {stats['rows']}"
        assert max(rows) < stats["rows"], f"{name}: one rank did all the work ({rows})"
        for result in ranks:  # an idle rank (fewer rows than ranks) evaluates one dummy row, nothing more
            assert 0 <= result["stats"][name]["model_rows"] - result["stats"][name]["rows"] <= stats["nfe"], name


def test_cases_cover_steps_with_and_without_the_unconditional_branch(
    reference: dict[str, tuple[torch.Tensor, dict[str, int]]],
) -> None:
    for name, (_, stats) in reference.items():
        if name.startswith(("interval", "adaptive")):
            assert 0 < stats["uncond_steps"] < dc.STEPS, (name, stats)


def test_ranks_that_disagree_or_fail_are_told_what_differs(launch: tuple[int, list[Any]]) -> None:
    world, ranks = launch
    for rank, result in enumerate(ranks):
        errors = result["errors"]
        assert "x on ranks" in errors["seed"] and "seed every rank the same" in errors["seed"], errors
        assert "strategy on ranks" in errors["strategy"] and f"rank {rank} of {world}" in errors["strategy"], errors
        assert f"CFG(scale={3.0 + rank})" in errors["strategy"]
        assert "got one already wrapped" in errors["twice"], errors
        assert "ShapeError: inner: expected ExtraRow to predict the" in errors["extra-row"], errors
        if rank == 1:  # its own forward failed: its own error
            assert errors["failure"].startswith("NonFiniteError: model output"), errors
        else:  # the others stop too, naming it, instead of waiting in the gather
            assert "failure on rank(s) [1]" in errors["failure"] and f"rank {rank} stops too" in errors["failure"]
