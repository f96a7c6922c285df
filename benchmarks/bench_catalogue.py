"""The guidance catalogue side by side: combine cost, and sample quality on the embedded models.

    python benchmarks/bench_catalogue.py speed                  # combine time / CFG's, and / diffusers'
    python benchmarks/bench_catalogue.py quality --seeds 3      # every strategy at the same nominal w = 3
    python benchmarks/bench_catalogue.py quality --sweep        # each over its strength: best at acc >= 0.99

Speed: one thread, float32 ``(2, 4, 128, 128)`` (an SDXL latent pair) and ``(1, 16, 13, 60, 90)`` (a
CogVideoX-sized video latent); each operation is timed in interleaved rounds and the time per call is
reported as a ratio to ``CFG`` measured in the same run (the ratio is what carries over to other
machines; the best of 25 interleaved rounds, since a busy neighbour only adds time). diffusers' guiders
are timed like for like where they exist (FDG needs kornia).

Quality: :class:`guidekit.zoo.compare.DigitsBench` (the shipped class-conditional digits UNet, its
classifier and the real splits) and :class:`~guidekit.zoo.compare.GMMBench` (the exact Gaussian-mixture
oracle fitted to the digits), DDIM 20 trailing steps, every strategy from the same noise per seed; the
table gives the mean over seeds. Prints markdown tables for ``docs/choosing.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import guidekit as gk
from guidekit.zoo.cmdline import guarded, require_extras

SHAPES: tuple[tuple[int, ...], ...] = ((2, 4, 128, 128), (1, 16, 13, 60, 90))


def best_times(fns: dict[str, Callable[[], object]], rounds: int = 25, budget_s: float = 0.02) -> dict[str, float]:
    """Best over interleaved rounds of the mean seconds per call of each function.

    The minimum, not the median: on a shared machine a busy neighbour only ever adds time.
    """
    numbers = {}
    for name, fn in fns.items():
        fn()
        start = time.perf_counter()
        fn()
        numbers[name] = max(1, int(budget_s / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(numbers[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / numbers[name])
    return {name: min(v) for name, v in samples.items()}


def speed_operations(shape: tuple[int, ...]) -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(shape, generator=gen)
    u = 0.9 * c + 0.3 * torch.randn(shape, generator=gen)
    sigmas = gk.samplers.karras_sigmas(30, 0.002, 80.0)
    ctx = gk.GuidanceContext(sigma=torch.full((shape[0],), 2.0), step=10, num_steps=30, sigmas=sigmas)
    ours: dict[str, gk.GuidanceStrategy] = {
        "CFG": gk.CFG(5.0),
        "ADG": gk.ADG(5.0),
        "TCFG": gk.TCFG(5.0),
        "CFG-Zero*": gk.CFGZeroStar(5.0, zero_init_steps=0),
        "FDG": gk.FDG((10.0, 5.0)),
        "CFG++": gk.CFGPlusPlus(0.6),
        "TV-CFG(CFG)": gk.TVCFG(gk.CFG(5.0)),
        "Ramp(CFG)": gk.Ramp(gk.CFG(5.0)),
        "AG(CFG)": gk.AdaptiveGuidance(gk.CFG(5.0), threshold=1.0),
    }
    ops: dict[str, Callable[[], object]] = {name: (lambda s=s: s.combine(c, u, ctx)) for name, s in ours.items()}
    from diffusers.guiders import ClassifierFreeZeroStarGuidance, TangentialClassifierFreeGuidance

    for name, guider in (
        ("diffusers TCFG", TangentialClassifierFreeGuidance(guidance_scale=5.0)),
        ("diffusers CFG-Zero*", ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=0)),
    ):
        guider.set_state(step=10, num_inference_steps=30, timestep=torch.tensor(500))
        ops[name] = lambda g=guider: g.forward(c, u)
    try:
        from diffusers.guiders import FrequencyDecoupledGuidance

        fdg = FrequencyDecoupledGuidance(guidance_scales=[10.0, 5.0])
        fdg.set_state(step=10, num_inference_steps=30, timestep=torch.tensor(500))
        if len(shape) == 4:  # 4D only (kornia)
            ops["diffusers FDG (kornia)"] = lambda: fdg.forward(c, u)
    except ImportError:
        pass
    return ops


def speed() -> None:
    torch.set_num_threads(1)
    print("| operation | " + " | ".join(str(s) for s in SHAPES) + " |")
    print("|---|" + "---|" * len(SHAPES))
    results = {}
    for shape in SHAPES:
        times = best_times(speed_operations(shape))
        results[shape] = {k: v / times["CFG"] for k, v in times.items()} | {"CFG ms": times["CFG"] * 1e3}
    names = dict.fromkeys(k for r in results.values() for k in r)
    for name in names:
        cells = []
        for shape in SHAPES:
            v = results[shape].get(name)
            cells.append("–" if v is None else (f"{v:.2f} ms" if name == "CFG ms" else f"{v:.2f}x"))
        print(f"| {name} | " + " | ".join(cells) + " |")


def quality_strategies(bench_name: str) -> dict[str, gk.GuidanceStrategy]:
    """Every strategy at the same nominal strength, w = 3 (CFG++ at two λ)."""
    w = 3.0
    out: dict[str, gk.GuidanceStrategy] = {
        "none (CFG 1)": gk.CFG(1.0),
        f"CFG {w:g}": gk.CFG(w),
        f"ADG {w:g}": gk.ADG(w),
        f"TCFG {w:g}": gk.TCFG(w),
        f"CFG-Zero* {w:g} (no zero-init: eps model)": gk.CFGZeroStar(w, zero_init_steps=0),
        "FDG (4, 2)": gk.FDG((4.0, 2.0)),
        "CFG++ 0.2": gk.CFGPlusPlus(0.2),
        "CFG++ 0.4": gk.CFGPlusPlus(0.4),
        f"TV-CFG(CFG {w:g})": gk.TVCFG(gk.CFG(w)),
        f"Ramp(CFG {w:g})": gk.Ramp(gk.CFG(w)),
        f"DynamicCFG step (CFG {w:g})": gk.DynamicCFG(gk.CFG(w), position="step"),
        f"AG(CFG {w:g}, 0.99)": gk.AdaptiveGuidance(gk.CFG(w), threshold=0.99),
        f"AG(CFG {w:g}, 0.999)": gk.AdaptiveGuidance(gk.CFG(w), threshold=0.999),
    }
    if bench_name == "digits":
        out["AutoGuidance 2 (weak UNet)"] = gk.AutoGuidance(2.0)
    return out


def sweep_strategies(bench_name: str) -> dict[str, list[tuple[str, gk.GuidanceStrategy]]]:
    """Each family over its own strength parameter (the setting is the label)."""
    families: dict[str, list[tuple[str, gk.GuidanceStrategy]]] = {
        "CFG": [(f"w={w:g}", gk.CFG(w)) for w in (1.5, 2, 3, 5)],
        "ADG": [(f"w={w:g}", gk.ADG(w)) for w in (2, 3, 5, 8)],
        "TCFG": [(f"w={w:g}", gk.TCFG(w)) for w in (2, 3, 5, 8)],
        "CFG-Zero* (zero_init_steps=0)": [(f"w={w:g}", gk.CFGZeroStar(w, zero_init_steps=0)) for w in (1.5, 2, 3, 5)],
        "FDG": [(f"w={hi:g},{lo:g}", gk.FDG((hi, lo))) for hi, lo in ((2, 1), (3, 1.5), (4, 2), (6, 3))],
        "CFG++": [(f"λ={lam:g}", gk.CFGPlusPlus(lam)) for lam in (0.3, 0.4, 0.6, 0.8)],
        "TV-CFG(CFG)": [(f"w̄={w:g}", gk.TVCFG(gk.CFG(w))) for w in (1.5, 2, 3)],
        "Ramp(CFG)": [(f"w̄={w:g}", gk.Ramp(gk.CFG(w))) for w in (1.5, 2, 3, 5)],
        "DynamicCFG step (CFG)": [(f"w={w:g}", gk.DynamicCFG(gk.CFG(w), position="step")) for w in (2, 3, 5, 8)],
        "AG(CFG, 0.99)": [(f"w={w:g}", gk.AdaptiveGuidance(gk.CFG(w))) for w in (1.5, 2, 3, 5)],
    }
    if bench_name == "digits":
        families["AutoGuidance"] = [(f"w={w:g}", gk.AutoGuidance(w)) for w in (1.5, 2, 3, 4)]
    return families


def _mean_metrics(bench: object, strategy: gk.GuidanceStrategy, settings: object, seeds: int) -> dict[str, float]:
    runs = [bench.run(strategy, settings, seed).metrics for seed in range(seeds)]  # type: ignore[attr-defined]
    return {k: statistics.mean(r[k] for r in runs) for k in runs[0]}


def quality(seeds: int, per_class: int, sweep: bool) -> None:
    from guidekit.zoo.compare import DigitsBench, GMMBench, Settings

    torch.set_num_threads(1)
    settings = Settings(per_class=per_class)
    for bench in (DigitsBench(), GMMBench()):
        cols = ("acc", bench.quality, "recall" if bench.name == "digits" else "log_p", "over_share", "nfe")
        print(f"\n{bench.name}: {per_class} per class x {bench.num_classes} classes, {seeds} seeds, DDIM 20 steps")
        if not sweep:
            print("| strategy | " + " | ".join(cols) + " |")
            print("|---|" + "---|" * len(cols))
            for label, strategy in quality_strategies(bench.name).items():
                means = _mean_metrics(bench, strategy, settings, seeds)
                print(f"| {label} | " + " | ".join(_fmt(k, means[k]) for k in cols) + " |", flush=True)
            continue
        # best quality among the settings that reach full class fidelity (acc >= 0.99)
        print("| strategy | best setting | " + " | ".join(cols) + " | settings tried (acc, " + bench.quality + ") |")
        print("|---|---|" + "---|" * len(cols) + "---|")
        for family, variants in sweep_strategies(bench.name).items():
            rows = [(label, _mean_metrics(bench, s, settings, seeds)) for label, s in variants]
            ok = [r for r in rows if r[1]["acc"] >= 0.99]
            label, best = min(ok, key=lambda r: r[1][bench.quality]) if ok else ("none reaches 0.99", None)
            tried = "; ".join(f"{lab} ({m['acc']:.2f}, {_fmt(bench.quality, m[bench.quality])})" for lab, m in rows)
            cells = " | ".join(_fmt(k, best[k]) for k in cols) if best else " | ".join("–" for _ in cols)
            print(f"| {family} | {label} | {cells} | {tried} |", flush=True)


def _fmt(column: str, value: float) -> str:
    if column == "nfe":
        return f"{value:.0f}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["speed", "quality"])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="each family over its strength; best at acc >= 0.99")
    args = parser.parse_args()
    if args.what == "quality":
        require_extras("quality", ["sklearn"])
    speed() if args.what == "speed" else quality(args.seeds, args.per_class, args.sweep)


if __name__ == "__main__":
    raise SystemExit(guarded("benchmarks/bench_catalogue.py", main))
