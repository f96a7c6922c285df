"""The sampling loop: strategies at matched class accuracy on the oracle, and the loop's own overhead.

    python benchmarks/bench_loop.py            # prints the tables and writes the "Sampling loop" section
    python benchmarks/bench_loop.py --no-write

1. **Quality and NFE at matched posterior accuracy.** A class-conditional Gaussian mixture with
   overlapping classes (guidekit.oracle), exact eps predictions. For CFG, Interval(CFG), APG and SAMG the
   guidance strength is bisected until the mean Bayes posterior p(class | x) of the samples reaches a
   target; at that strength we report the NFE per sample and the energy distance to exact samples of the
   class (full, and projected onto the span of the component means), both as multiples of the noise floor
   (exact vs exact). Lower is better: at equal class accuracy, a strategy that distorts the class less wins.
2. **Loop overhead per step.** A trivial model (one multiply-add) so that everything else shows: the model
   call alone on the batched ``[x; x]`` input, a minimal hand-written CFG Euler loop, and ``gk.sample``
   (CFG, euler), per step. Reported as ratios measured in the same interleaved rounds.

One thread; the CPU is shared, so times are medians of interleaved rounds and only ratios are reported.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Callable

import torch
from _docs import replace_section

import guidekit as gk
from guidekit.oracle import GaussianMixture, energy_distance
from guidekit.samplers import VPModel, karras_sigmas

SECTION = "## Sampling loop"
F64 = torch.float64


# -- 1. matched posterior accuracy ----------------------------------------------------------------------
def oracle() -> GaussianMixture:
    return GaussianMixture.random(num_classes=3, components=2, event_shape=(1, 4, 4), spread=1.6, std=0.6, seed=3)


STRATEGIES: dict[str, Callable[[float], gk.GuidanceStrategy]] = {
    "CFG": lambda w: gk.CFG(w),
    "Interval(CFG), (0.28, 5.42]": lambda w: gk.Interval(gk.CFG(w), 0.28, 5.42),
    "APG (eta 0, momentum -0.5, no cap)": lambda w: gk.APG(scale=w, eta=0.0, norm_threshold=0.0, momentum=-0.5),
    "SAMG (w_min, w_max) = (2w/3, 1.6w)": lambda w: gk.SAMG(w=w),
}


def run(gm: GaussianMixture, strategy: gk.GuidanceStrategy, n: int, steps: int) -> tuple[torch.Tensor, int]:
    labels = torch.arange(n) % 3
    adapter = VPModel(gm.as_model("eps"), prediction="eps")
    x_t = torch.randn(n, *gm.event_shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    records: list[gk.StepRecord] = []
    x = gk.sample(adapter, x_t, sampler="dpmpp-2m", schedule=karras_sigmas(steps, adapter.sigma_min, adapter.sigma_max),
                  strategy=strategy, cond=labels, uncond=torch.full((n,), -1), callback=records.append,
                  progress=False)  # fmt: skip
    return x, records[-1].nfe


def posterior(gm: GaussianMixture, x: torch.Tensor) -> float:
    return float(gm.class_posterior(x, torch.arange(x.shape[0]) % 3).mean())


def matched(gm, make, target, n, steps, lo=1.0, hi=12.0, iters=12):
    """Bisect the strength ``w`` until the mean posterior reaches ``target`` (it rises with w)."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        x, _ = run(gm, make(mid), n, steps)
        lo, hi = (mid, hi) if posterior(gm, x) < target else (lo, mid)
    w = 0.5 * (lo + hi)
    x, nfe = run(gm, make(w), n, steps)
    return w, x, nfe


def quality_table(n: int, steps: int, target: float) -> tuple[str, dict[str, float]]:
    gm = oracle()
    labels = torch.arange(n) % 3
    g = torch.Generator().manual_seed(7)
    ref = gm.sample(labels, generator=g)
    floors = [gm.sample(labels, generator=torch.Generator().manual_seed(100 + k)) for k in range(4)]
    floor = statistics.mean(energy_distance(f, ref) for f in floors)
    pfloor = statistics.mean(energy_distance(gm.project(f), gm.project(ref)) for f in floors)
    base, _ = run(gm, gk.CFG(1.0), n, steps)
    rows = [
        f"Oracle: 3 classes x 2 components, event (1, 4, 4), overlapping classes; {n} samples, "
        f"DPM-Solver++(2M), {steps} Karras steps on the VP (DDPM linear) grid. Exact class samples have mean "
        f"p(class|x) = {posterior(gm, ref):.3f}; conditional sampling (w = 1) reaches {posterior(gm, base):.3f}, "
        f"ED {energy_distance(base, ref) / floor:.2f}x floor. Target p(class|x) = {target}.",
        "",
        "| strategy | strength w at target | NFE / sample | ED / floor | projected ED / floor |",
        "|---|---|---|---|---|",
    ]
    figures = {}
    for name, make in STRATEGIES.items():
        w, x, nfe = matched(gm, make, target, n, steps)
        ed, ped = energy_distance(x, ref) / floor, energy_distance(gm.project(x), gm.project(ref)) / pfloor
        rows.append(f"| {name} | {w:.2f} | {nfe} | {ed:.1f} | {ped:.1f} |")
        figures[name] = ed
    return "\n".join(rows), figures


# -- 2. loop overhead --------------------------------------------------------------------------------------
def median_times(
    fns: dict[str, Callable[[], object]], rounds: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, float]:
    """Median over interleaved rounds of the seconds per call of each function (on ``clock``)."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = clock()
            fn()
            samples[name].append(clock() - start)
    return {name: statistics.median(v) for name, v in samples.items()}


def overhead_row(
    shape: tuple[int, ...],
    layout: str,
    rounds: int,
    steps: int = 20,
    device: str | torch.device = "cpu",
    clock: Callable[[], float] = time.perf_counter,
) -> str:
    """One table row: per-step times of the model call, a hand-written loop and ``gk.sample``."""
    b = shape[0]

    def model(x, t, c):
        return x * 0.9 + 0.1

    x_t = torch.randn(shape).to(device)
    both = torch.cat([torch.zeros(b), torch.ones(b)]).to(device)
    adapter = gk.samplers.adapt(model, "eps", layout=layout)
    sigmas = karras_sigmas(steps, adapter.sigma_min, adapter.sigma_max).float()
    doubled, t = torch.cat([x_t, x_t]), torch.full((2 * b,), 500.0, device=device)

    def model_call():
        for _ in range(steps):
            model(doubled, t, both)

    def hand():  # the smallest correct loop: eps model, CFG, Euler in EDM coordinates, no layout change
        x = x_t * float(torch.sqrt(1 + sigmas[0] ** 2))
        for i in range(steps):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            t_s = adapter.model_time(torch.full((2 * b,), s, device=device))
            eps = model(torch.cat([x, x]) / (1 + s * s) ** 0.5, t_s, both)
            eps = eps[b:] + 3.0 * (eps[:b] - eps[b:])
            x = x + (s_next - s) * eps
        return x

    def loop():
        gk.sample(adapter, x_t, schedule=sigmas, strategy=gk.CFG(3.0), cond=both[:b], uncond=both[b:], progress=False)

    fns = {"model": model_call, "hand": hand, "loop": loop}
    per = {k: v / steps for k, v in median_times(fns, rounds, clock).items()}
    return (
        f"| {tuple(shape)} ({layout}) | {per['model'] * 1e6:.0f} µs | {per['hand'] * 1e6:.0f} µs | "
        f"{per['loop'] * 1e6:.0f} µs | {per['loop'] / per['hand']:.2f} | {(per['loop'] - per['model']) * 1e6:.0f} |"
    )


def overhead_table(
    rounds: int, device: str | torch.device = "cpu", clock: Callable[[], float] = time.perf_counter
) -> str:
    rows = [
        "| latent (layout) | model call | hand-written CFG Euler step | `gk.sample` step | gk / hand | "
        "gk − model (µs) |",
        "|---|---|---|---|---|---|",
    ]
    for shape, layout in (((2, 4, 64, 64), "b c h w"), ((1, 13, 16, 30, 45), "b f c h w")):
        rows.append(overhead_row(shape, layout, rounds, device=device, clock=clock))
    return "\n".join(rows)


def write_section(quality: str, overhead: str) -> None:
    body = (
        f"{SECTION}\n\n"
        f"`python benchmarks/bench_loop.py` on {datetime.date.today().isoformat()}: torch {torch.__version__}, "
        "one CPU thread shared with other jobs (ratios, not absolute times, are the result).\n\n"
        "### Strategies at matched class accuracy (analytic oracle)\n\n"
        f"{quality}\n\n"
        "ED: energy distance to exact class samples, as a multiple of the noise floor (mean of 4 exact-vs-exact "
        "draws); *projected*: the same after projecting onto the span of the component means, where the "
        "classes differ. Guidance trades distribution fidelity for class accuracy; the table shows how much "
        "each strategy pays for the same accuracy and how many network evaluations it spends. The oracle has no "
        "spatial structure (isotropic components), so SAMG's per-point scale map cannot show its intended benefit "
        "(protecting detailed regions) and mostly adds variance; APG was designed against over-saturation at high "
        "scales in images and has nothing to saturate here. What this table does measure fairly is the NFE "
        "saving of limited-interval guidance at equal accuracy.\n\n"
        "### Loop overhead per step\n\n"
        "A trivial model (`x * 0.9 + 0.1`) isolates the loop. *model call*: the model alone on `[x; x]`; "
        "*hand-written*: the smallest correct CFG Euler loop (model time, scaling, CFG, update); `gk.sample`: "
        "adapter, conversions, context, checks, strategy, sampler and records. For the `(b, f, c, h, w)` row "
        "the loop also permutes to the canonical layout and back on every call.\n\n"
        f"{overhead}\n"
    )
    replace_section(SECTION, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    parser.add_argument("--n", type=int, default=1500, help="samples per run (oracle)")
    parser.add_argument("--steps", type=int, default=32, help="sampler steps (oracle)")
    parser.add_argument("--target", type=float, default=0.97, help="mean p(class | x) to match")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    quality, _ = quality_table(args.n, args.steps, args.target)
    print(quality, "\n")
    overhead = overhead_table(args.rounds)
    print(overhead)
    if not args.no_write:
        write_section(quality, overhead)


if __name__ == "__main__":
    main()
