"""benchmarks/bench_gpu.py (run by benchmarks/gpu.sh on a GPU): its CPU smoke test prints the three tables
and writes nothing; without CUDA, ``--device cuda`` is one ``error:`` line naming the argument, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_cpu_quick_prints_the_three_tables_and_writes_nothing() -> None:
    pytest.importorskip("diffusers")
    done = run_bench("--device", "cpu", "--quick", "--no-write")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for heading, table_head in (
        ("### Combine overhead", "| operation | `(2, 4, 32, 32)` µs | `(1, 16, 3, 12, 18)` µs |"),
        ("### Combine overhead", "| ratio | target |"),
        ("### Combine overhead", "| host sync | float32 `(2, 4, 32, 32)` |"),
        ("### Loop overhead per step", "| latent (layout) | model call |"),
        ("### diffusers integration", "| family | pipeline ms/step |"),
    ):
        assert heading in out and table_head in out, (heading, table_head, out[-3000:])
    for row in ("| guidekit CFG (step) |", "| ops.guidance.cfg |", "| APG / copy | ≤ 4.0 |", "| sd3 |"):
        assert row in out, row
    assert "wrote" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_one_error_line() -> None:
    done = run_bench("--device", "cuda")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("benchmarks/bench_gpu.py: error: --device: expected an available CUDA device")
    assert done.stderr.count("\n") == 1
