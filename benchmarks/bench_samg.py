"""SAMG benchmarks: combine cost against CFG, and quality on the embedded digits model.

    python benchmarks/bench_samg.py speed              # ratios SAMG / CFG on (2,4,128,128), (1,16,13,60,90)
    python benchmarks/bench_samg.py quality --seeds 2  # CFG vs SAMG variants over w on the digits bench

Speed: one thread, every variant timed in interleaved rounds, best round kept, in *thread CPU time*
(``time.thread_time``): on a shared CPU, wall time also counts the time other processes hold the core.
Both the bare ``combine`` and the checked ``__call__`` are reported. Quality: one setting for all
(DDIM, 20 steps, trailing schedule), the same noise per seed for every strategy; the mean scale is the
average of ``scale_map`` over the steps (for CFG: ``w``), so strategies can be compared at equal mean
strength as well as at equal nominal ``w``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

import guidekit as gk
from guidekit.energy import GaussianSmooth, MinMax, ThresholdMapper
from guidekit.zoo.cmdline import guarded, require_extras

SHAPES = ((2, 4, 128, 128), (1, 16, 13, 60, 90))


def _best(fns: dict[str, Callable[[], object]], number: int = 30, rounds: int = 15) -> dict[str, float]:
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.thread_time()
            for _ in range(number):
                fn()
            times[name].append((time.thread_time() - start) / number)
    return {name: min(values) for name, values in times.items()}


def _shape_times(shape: tuple[int, ...], variants: dict[str, gk.GuidanceStrategy]) -> dict[str, float]:
    """Best per-call seconds of ``name`` (bare ``combine``) and ``name()`` (checked ``__call__``)."""
    gen = torch.Generator().manual_seed(0)
    c, u = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    ctx = gk.GuidanceContext.default(c)
    fns: dict[str, Callable[[], object]] = {}
    for name, s in variants.items():
        fns[name] = partial(s.combine, c, u, ctx)
        fns[name + "()"] = partial(s, c, u, ctx)
    return _best(fns)


def speed() -> None:
    torch.set_num_threads(1)
    variants = {
        "cfg": gk.CFG(7.5),
        "samg": gk.SAMG(),
        "samg-threshold": gk.SAMG(mapper=ThresholdMapper()),
        "samg-bound": gk.SAMG(mapper=gk.energy.BoundMapper()),
        "samg-smooth": gk.SAMG(transforms=(GaussianSmooth(1.0), MinMax())),
    }
    print("| shape | variant | combine µs | ratio to CFG combine | __call__ µs | ratio to CFG __call__ |")
    print("|---|---|---|---|---|---|")
    for shape in SHAPES:
        best = _shape_times(shape, variants)
        for name in variants:
            comb, call = best[name], best[name + "()"]
            print(
                f"| {shape} | {name} | {comb * 1e6:.0f} | {comb / best['cfg']:.2f} | {call * 1e6:.0f} "
                f"| {call / best['cfg()']:.2f} |"
            )


def quality(seeds: int, per_class: int, scales: list[float]) -> None:
    from guidekit.zoo.compare import DigitsBench, Settings

    torch.set_num_threads(1)
    bench, settings = DigitsBench(), Settings(per_class=per_class)

    def variants(w: float) -> dict[str, gk.GuidanceStrategy]:
        w_min, w_max = 2 * w / 3, 1.6 * w
        return {
            "cfg": gk.CFG(w),
            "samg": gk.SAMG(w=w),
            "samg-increasing": gk.SAMG(mapper=gk.energy.LinearMapper(w_min, w_max, "increasing")),
            "samg-threshold": gk.SAMG(mapper=ThresholdMapper(w_min, w_max, q=0.5)),
        }

    cols = ("acc", "p_y", "fd_test", "over_share")
    print(f"digits, DDIM 20 steps, {per_class}/class, {seeds} seeds (mean)")
    print("| strategy | w | mean scale | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for w in scales:
        for name, strategy in variants(w).items():
            rows = [bench.run(strategy, settings, seed=seed) for seed in range(seeds)]
            means = {col: sum(r.metrics[col] for r in rows) / seeds for col in cols}
            scale = [rec.scale_mean for r in rows for rec in r.records if rec.scale_mean is not None]
            mean_scale = sum(scale) / len(scale) if scale else float("nan")
            print(f"| {name} | {w:g} | {mean_scale:.2f} | " + " | ".join(f"{means[c]:.3f}" for c in cols) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["speed", "quality"])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.5, 2.0, 3.0, 4.5])
    args = parser.parse_args()
    if args.what == "quality":
        require_extras("quality", ["sklearn"])
    if args.what == "speed":
        speed()
    else:
        quality(args.seeds, args.per_class, args.scales)


if __name__ == "__main__":
    raise SystemExit(guarded("benchmarks/bench_samg.py", main))
