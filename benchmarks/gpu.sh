#!/usr/bin/env bash
# The combine, loop and diffusers benchmarks on a GPU; rewrites the "GPU" section of docs/benchmarks.md.
#
#     bash benchmarks/gpu.sh            # from anywhere; extra arguments go to bench_gpu.py (e.g. --device cuda:1)
#
# Budget: under 5 minutes in all. bench_gpu.py writes the docs once, at its end, so a run stopped by the
# 290 s limit below leaves docs/benchmarks.md as it was.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null; then
    echo "benchmarks/gpu.sh: error: nvidia-smi not found; run this on a machine with an NVIDIA GPU" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
timeout 290 "${PYTHON:-python}" benchmarks/bench_gpu.py "$@"
