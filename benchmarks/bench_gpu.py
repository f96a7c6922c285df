"""The combine, loop and diffusers benchmarks on a GPU: absolute times and the same ratios, in one short run.

    bash benchmarks/gpu.sh                                    # the GPU's nvidia-smi line, then this script
    python benchmarks/bench_gpu.py                            # on cuda; writes the "GPU" section of the docs
    python benchmarks/bench_gpu.py --device cpu --quick       # smoke test: prints the tables, writes nothing

It reuses the CPU benchmarks' own functions (bench_combine.py, bench_loop.py, bench_diffusers.py) with their
tensors on ``--device`` and a device clock: on CUDA, CUDA events on the current stream, each reading
synchronised (``Event.synchronize``), so a time covers all the work queued by the calls it brackets. Times are
medians of interleaved rounds; each ratio is the median over rounds of the ratio within a round.

1. **Combine** at an SDXL latent ``(2, 4, 128, 128)`` and a CogVideoX latent ``(1, 16, 13, 60, 90)``, in
   float32, float16 and bfloat16: a copy, guidekit's CFG (``ops.guidance.cfg``, ``CFG.combine`` and the
   checked ``CFG.step``), APG, SAMG, and diffusers' CFG and APG guiders, with issue 18's targets. Each
   operation is also run once under ``torch.cuda.set_sync_debug_mode("error")``: *host sync* says whether
   it makes the host wait for the device (``.item()``, ``.tolist()``, a data-dependent branch).
2. **Loop overhead per step**: a trivial model, a hand-written CFG Euler loop and ``gk.sample``.
3. **diffusers integration**: the six tiny pipelines, ``generate()`` against the pipeline's own loop.

The defaults are sized for about two minutes on one H100-class GPU (an estimate from the CPU runs, not yet
measured on a GPU; benchmarks/gpu.sh stops the run at 290 s, before anything is written). ``--quick`` is a
smoke test, not a measurement: small latents, float32 only, one tiny pipeline, a round or two.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import bench_combine
import bench_loop
import torch
from _docs import DOC, replace_section

from guidekit.errors import ConfigError
from guidekit.ops import guidance
from guidekit.zoo.cmdline import guarded, require_extras

SECTION = "## GPU"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HOWTO = (
    "On a machine with a CUDA GPU, `bash benchmarks/gpu.sh` prints the GPU's `nvidia-smi` line and runs "
    "`python benchmarks/bench_gpu.py`: the combine, loop and diffusers benchmarks above on `cuda` (absolute "
    "times and the same ratios, timed with CUDA events), in under 5 minutes. It rewrites this section. "
    "`--device cpu --quick` is the smoke test that runs anywhere and writes nothing (`--write` to force).\n\n"
    "```bash\n"
    "bash benchmarks/gpu.sh\n"
    "python benchmarks/bench_gpu.py --device cpu --quick  # smoke test, no GPU needed\n"
    "```\n"
)


@dataclass(frozen=True)
class Plan:
    """Rounds and sizes of one run (``--quick`` shrinks them to a smoke test)."""

    dtypes: tuple[str, ...] = tuple(DTYPES)
    shapes: tuple[tuple[int, ...], ...] = bench_combine.SHAPES
    combine_rounds: int = 21
    combine_budget_s: float = 0.01
    loop_rounds: int = 15
    diffusers_steps: int = 20
    diffusers_rounds: int = 9
    families: tuple[str, ...] = ()  # () for all of TINY_FAMILIES


QUICK = Plan(
    dtypes=("float32",),
    shapes=((2, 4, 32, 32), (1, 16, 3, 12, 18)),
    combine_rounds=3,
    combine_budget_s=0.001,
    loop_rounds=2,
    diffusers_steps=2,
    diffusers_rounds=1,
    families=("sd3",),
)
"""The smoke test: small latents, one dtype, one tiny pipeline, a round or two; it checks that everything runs."""


def resolve_device(name: str) -> torch.device:
    """``--device`` as a torch device; a CUDA device that this torch cannot use is a user error."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: expected cuda, cuda:N or cpu, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"--device: expected an available CUDA device, got {name!r} but torch {torch.__version__} sees none "
            "(use --device cpu --quick for a smoke test)"
        )
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"--device: expected cuda, cuda:N or cpu, got {name!r}")
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device: expected one of {torch.cuda.device_count()} CUDA devices, got {name!r}")
        torch.cuda.set_device(device)
    return device


def device_clock(device: torch.device) -> Callable[[], float]:
    """Seconds on ``device``'s timeline: on CUDA an event recorded now, waited for, against a first event."""
    if device.type != "cuda":
        return time.perf_counter
    origin = torch.cuda.Event(enable_timing=True)
    origin.record()

    def clock() -> float:
        mark = torch.cuda.Event(enable_timing=True)
        mark.record()
        mark.synchronize()
        return origin.elapsed_time(mark) / 1e3

    return clock


def host_sync(fn: Callable[[], object], device: torch.device) -> str:
    """``yes`` if ``fn`` makes the host wait for the device (it raises under sync debug mode "error")."""
    if device.type != "cuda":
        return "n/a"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as exc:
        if "synchroniz" not in str(exc):
            raise
        return "yes"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "no"


def combine_operations(
    shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> dict[str, Callable[[], object]]:
    """bench_combine's operations on ``device`` in ``dtype``, with the functional ``ops.guidance.cfg`` added."""
    c, u = bench_combine.inputs(shape, device, dtype)
    ops: dict[str, Callable[[], object]] = {}
    for name, fn in bench_combine.operations(shape, device, dtype).items():
        ops[name] = fn
        if name == "lerp into a buffer":
            ops["ops.guidance.cfg"] = lambda: guidance.cfg(c, u, 7.5)
    return ops


def combine_tables(device: torch.device, plan: Plan, clock: Callable[[], float]) -> str:
    """Per dtype bench_combine's time and ratio tables; then one table of host syncs."""
    parts, syncs = [], {}
    for dtype_name in plan.dtypes:
        results = {}
        for shape in plan.shapes:
            ops = combine_operations(shape, device, DTYPES[dtype_name])
            rounds = bench_combine.round_times(ops, plan.combine_rounds, plan.combine_budget_s, clock)
            results[shape] = bench_combine.summarise(rounds)
            syncs[f"{dtype_name} `{shape}`"] = {name: host_sync(fn, device) for name, fn in ops.items()}
        parts.append(f"#### {dtype_name}\n\n{bench_combine.markdown(results)}")
    columns = list(syncs)
    lines = [
        "| host sync | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        *(f"| {op} | " + " | ".join(syncs[col][op] for col in columns) + " |" for op in syncs[columns[0]]),
    ]
    parts.append("#### Host synchronisation\n\n" + "\n".join(lines))
    return "\n\n".join(parts)


def diffusers_table(device: torch.device, plan: Plan, clock: Callable[[], float]) -> str:
    import bench_diffusers  # imports the diffusers integration: after the extra was checked

    from guidekit.integrations.diffusers.tiny import TINY_FAMILIES

    # on a GPU, batching [cond; uncond] into one forward may pick other kernels than the pipeline's two
    tolerance = 1e-5 if device.type == "cpu" else 1e-3
    rows = bench_diffusers.measure(
        list(plan.families or TINY_FAMILIES), plan.diffusers_steps, plan.diffusers_rounds, device, clock, tolerance
    )
    return bench_diffusers.markdown(rows, plan.diffusers_steps)


def describe(device: torch.device) -> str:
    """The device, torch / CUDA versions and the date, for the section's first line."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if device.type == "cuda":
        what = (
            f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}"
        )
    else:
        what = f"CPU, torch {torch.__version__}"
    return f"{what}, {when}"


def write_section(header: str, tables: dict[str, str], plan: Plan, device: torch.device) -> None:
    clock = "the device's timeline between CUDA events (each waited for)" if device.type == "cuda" else "wall time"
    body = (
        f"{SECTION}\n\n{HOWTO}\n{header}. Times: {clock}, "
        f"median of interleaved rounds ({plan.combine_rounds} for the combine, {plan.loop_rounds} for the loop, "
        f"{plan.diffusers_rounds} of {plan.diffusers_steps} steps for diffusers); ratios: median of the "
        "within-round ratios. The tables are those of the CPU sections above, on the GPU; the combine adds "
        "`ops.guidance.cfg` (the functional CFG) and the dtypes, and a host-sync table.\n\n"
        + "\n\n".join(f"### {title}\n\n{table}" for title, table in tables.items())
        + "\n"
    )
    replace_section(SECTION, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a smoke test")
    parser.add_argument("--quick", action="store_true", help="a few rounds, float32 only: a smoke test")
    parser.add_argument(
        "--write",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="update docs/benchmarks.md (default: on cuda without --quick)",
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    require_extras("benchmarks/bench_gpu.py", ["diffusers"], extra="diffusers")
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # "guiders are experimental" on every construction
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    plan = QUICK if args.quick else Plan()
    if device.type == "cpu":
        torch.set_num_threads(1)  # like the CPU benchmarks
    header = f"`{shlex.join(['python', 'benchmarks/bench_gpu.py', *sys.argv[1:]])}` on {describe(device)}"
    print(header, flush=True)
    clock = device_clock(device)
    parts: dict[str, Callable[[], str]] = {
        "Combine overhead": lambda: combine_tables(device, plan, clock),
        "Loop overhead per step": lambda: bench_loop.overhead_table(plan.loop_rounds, device, clock),
        "diffusers integration": lambda: diffusers_table(device, plan, clock),
    }
    tables = {}
    for title, part in parts.items():
        start = time.perf_counter()
        tables[title] = part()
        print(f"\n### {title} ({time.perf_counter() - start:.0f} s)\n\n{tables[title]}", flush=True)
    if args.write if args.write is not None else device.type == "cuda" and not args.quick:
        write_section(header, tables, plan, device)
        print(f"\nwrote {DOC}")


if __name__ == "__main__":
    raise SystemExit(guarded("benchmarks/bench_gpu.py", main))
