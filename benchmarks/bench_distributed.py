"""Branch-parallel CFG (``guidekit.distributed``) on 2 CPU processes against one process, per sampler step.

    python benchmarks/bench_distributed.py            # launches torchrun itself, prints, writes the section
    python benchmarks/bench_distributed.py --no-write

One ``torchrun --nproc-per-node 2`` job (gloo, 127.0.0.1), one thread per process. In interleaved rounds it
times a CFG Euler run (batch ``b``, so ``2b`` rows per step) three ways: branch-parallel on both ranks (one
branch per rank, one all-gather of ``b`` rows per step), one process with one thread (rank 1 waits at a
barrier), and one process with two threads (the same cores as the pair). It also times the all-gather alone.
Models: a convolutional net heavy enough that its forward dominates (its FLOPs grow with the rows, unlike a
small-batch MLP's weight-bound matmuls), and a light one where it does not.
The CPU may be shared, so per-step times are reported as best / median over interleaved rounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _docs import replace_section
from torch import Tensor, nn

import guidekit as gk
from guidekit import distributed
from guidekit.samplers import EDMModel, karras_sigmas, sample_euler
from guidekit.samplers.base import StepInfo

SECTION = "## Branch-parallel guidance (torch.distributed)"
SHAPE = (4, 32, 32)
STEPS = 8


class ConvNet(nn.Module):
    """An EDM x0 model: ``depth`` 3x3 convolutions of ``width`` channels plus a class embedding (FLOPs per row)."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        channels = SHAPE[0]
        self.embed = nn.Embedding(11, width)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.body = nn.Sequential(
            *[m for _ in range(depth) for m in (nn.Conv2d(width, width, 3, padding=1), nn.SiLU())]
        )
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    @torch.no_grad()
    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor) -> Tensor:
        s = sigma.reshape(-1, 1, 1, 1)
        h = self.inp(x / (1 + s**2).sqrt()) + self.embed(labels + 1)[:, :, None, None]
        return x - self.out(self.body(h)) * s

    def flops_per_row(self) -> int:
        area = SHAPE[1] * SHAPE[2]
        return sum(2 * m.weight.numel() * area for m in self.modules() if isinstance(m, nn.Conv2d))


def run(model: ConvNet, batch: int, parallel: bool) -> Callable[[list[float]], Tensor]:
    """A CFG Euler run that appends the seconds of each guided evaluation (one step) to the list it is given."""
    labels = torch.arange(batch) % 10
    x = torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(0)) * 80.0
    sigmas = karras_sigmas(STEPS, 0.002, 80.0)

    def go(times: list[float]) -> Tensor:
        make = distributed.guided if parallel else gk.guided
        den = make(EDMModel(model), gk.CFG(4.0), labels, torch.full((batch,), -1))

        def timed(x: Tensor, sigma: Tensor, info: StepInfo) -> Tensor:
            start = time.perf_counter()
            out = den(x, sigma, info)
            times.append(time.perf_counter() - start)
            return out  # type: ignore[return-value]

        return sample_euler(timed, x, sigmas)

    return go


def worker(out: str, rounds: int, batch: int) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results: dict[str, dict[str, Any]] = {}
    for name, width, depth in (("conv 64 ch x 4", 64, 4), ("conv 8 ch x 1", 8, 1)):
        torch.manual_seed(0)
        model = ConvNet(width, depth).eval()
        flops = model.flops_per_row() * 2 * batch
        par, one = run(model, batch, True), run(model, batch, False)
        first = par([])
        same = rank != 0 or torch.equal(first, one([]))  # rank 0 compares with one process
        times: dict[str, list[float]] = {"parallel": [], "one thread": [], "two threads": [], "gather": []}
        pred = torch.zeros(batch, *SHAPE)
        for _ in range(rounds):
            dist.barrier()
            par(times["parallel"])
            for key, threads in (("one thread", 1), ("two threads", 2)):
                dist.barrier()
                if rank == 0:
                    torch.set_num_threads(threads)
                    one(times[key])
                    torch.set_num_threads(1)
                dist.barrier()
            received = [torch.empty_like(pred) for _ in range(2)]
            start = time.perf_counter()
            dist.all_gather(received, pred)
            times["gather"].append(time.perf_counter() - start)
        results[name] = {k: (min(v), statistics.median(v)) for k, v in times.items() if v}
        results[name].update(
            load=os.getloadavg()[0],
            flops_per_step=flops,
            bit_identical=same,
            gather_bytes=pred.numel() * pred.element_size(),
        )
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def launch(rounds: int, batch: int) -> dict[str, dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        out = os.path.join(tmp, "result.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1"]
        options = ["--worker", out, f"--rounds={rounds}", f"--batch={batch}"]
        command = [*launcher, f"--master-port={port}", __file__, *options]
        subprocess.run(command, env=env, check=True)
        return json.loads(Path(out).read_text())


def table(results: dict[str, dict[str, Any]], batch: int, rounds: int) -> str:
    rows = [
        f"`python benchmarks/bench_distributed.py` ({datetime.date.today()}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPU cores, shared). CFG(4), Euler, {STEPS} steps, batch {batch} (so {2 * batch} rows "
        f"per step), sample {SHAPE} float32, an EDM x0 convolutional net (3x3 convolutions); gloo on 127.0.0.1, one "
        f"thread per process, per-step times over {rounds} interleaved rounds "
        f"of {STEPS} steps as *best / median* (the cores are shared with other work: the best step is the "
        "closest to an idle machine). "
        "*ratio* = branch-parallel step time / one-process step time (the issue's target: close to 0.5 plus "
        "the gather).",
        "",
        "| model | GFLOP / step | one process, 1 thread | 1 process, 2 threads | branch-parallel, 2 x 1 thread "
        "| ratio vs 1 thread | ratio vs 2 threads | all-gather (b rows) | 0.5 + gather / one | bit-identical |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        (one, one_m), (two, two_m), (par, par_m), (gather, _) = (
            r[k] for k in ("one thread", "two threads", "parallel", "gather")
        )
        rows.append(
            f"| {name} | {r['flops_per_step'] / 1e9:.2f} | {one * 1e3:.1f} / {one_m * 1e3:.1f} ms | "
            f"{two * 1e3:.1f} / {two_m * 1e3:.1f} ms | {par * 1e3:.1f} / {par_m * 1e3:.1f} ms | "
            f"**{par / one:.2f}x** / {par_m / one_m:.2f}x | {par / two:.2f}x / {par_m / two_m:.2f}x | "
            f"{gather * 1e3:.2f} ms ({r['gather_bytes'] / 1024:.0f} KiB) | {0.5 + gather / one:.2f} | "
            f"{r['bit_identical']} |"
        )
    rows += [
        "",
        "Per step the pair runs one branch each (`b` rows) and all-gathers `b` rows of predictions, so "
        "`T_2 = T_1 / 2 + t_gather + t_loop` (the loop and the combine run on both ranks): the last-but-one "
        "column is that model's prediction from the one-process time and the measured gather. The heavy net "
        "is where branch-parallel pays; on the light one the gather, the per-call overhead and the two "
        "processes waiting for each other take the gain. The two-thread column is one process using both "
        f"cores; the load average while measuring was {results_load(results)}, so a second thread (and the "
        "second rank) competed with other jobs: read the ratios, not the times. No GPU was measured (this "
        "session had no device).",
    ]
    return "\n".join(rows)


def results_load(results: dict[str, dict[str, Any]]) -> str:
    loads = [r["load"] for r in results.values() if "load" in r]
    return f"{min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores" if loads else "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(1)
        worker(args.worker, args.rounds, args.batch)
        return
    text = table(launch(args.rounds, args.batch), args.batch, args.rounds)
    print(text)
    if not args.no_write:
        replace_section(SECTION, f"{SECTION}\n\n{text}\n")


if __name__ == "__main__":
    main()
