"""Quality benchmark on the embedded digits model: every strategy against the CFG frontier.

    python benchmarks/bench_quality.py                  # full run: 1000 samples x 3 seeds, 30 DDIM steps
    python benchmarks/bench_quality.py --per-class 10 --seeds 0 --steps 10 --out /tmp/q   # smoke run

CFG traces a frontier of (class accuracy, FD) over ~8 scales. Every other strategy is run at 2-3
strengths chosen to land inside that accuracy range, from the same noise per seed, and is reported as
its *paired excess FD*: its FD minus the CFG frontier's FD at the same accuracy (linear interpolation
between the two CFG scales that bracket it), per seed, then mean and spread over seeds. Negative is
better than CFG. The same is done at matched mean p(y|x). NFE is per sample.

Writes ``quality.json`` (every run), ``quality.md`` (the tables) and the figures (FD-vs-accuracy plot,
image grid) into ``--out`` (default ``benchmarks/results``); ``--img`` copies the figures to docs/img.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import guidekit as gk
from guidekit.energy import BoundMapper, GaussianSmooth, LinearMapper, MinMax, ThresholdMapper
from guidekit.metrics import excess_over_frontier
from guidekit.zoo.cmdline import guarded, require_extras
from guidekit.zoo.compare import DigitsBench, Settings
from guidekit.zoo.figures import frontier_plot, image_grid
from guidekit.zoo.report import Comparison, Entry, run_comparison

CFG_SCALES = (0.8, 0.9, 1.0, 1.05, 1.1, 1.15, 1.2, 1.3, 1.5)


def entries() -> list[Entry]:
    """The CFG frontier, then every option of SAMG, Interval(CFG) and APG at 2-3 strengths.

    Strengths were calibrated (300 samples, one seed) to land at class accuracy 0.97-0.995, where the
    CFG frontier is dense; a setting that lands outside the frontier's range is reported as such.
    """
    out = [Entry("cfg", f"w={s:g}", gk.CFG(s)) for s in CFG_SCALES]

    def add(
        family: str, strengths: tuple[float, ...], make: Callable[[float], gk.GuidanceStrategy], p: str = "w"
    ) -> None:
        out.extend(Entry(family, f"{p}={s:g}", make(s)) for s in strengths)

    def linear(lo: float, hi: float, direction: str = "decreasing") -> Callable[[float], gk.GuidanceStrategy]:
        return lambda w: gk.SAMG(mapper=LinearMapper(lo * w, hi * w, direction))  # type: ignore[arg-type]

    # SAMG: range [2w/3, 1.6w] unless stated; high energy -> low scale unless "increasing"
    add("samg linear", (0.95, 1.05, 1.15), lambda w: gk.SAMG(w=w))
    add("samg increasing (control)", (0.9, 1.0, 1.1), linear(2 / 3, 1.6, "increasing"))
    add("samg threshold q=0.5", (1.5, 1.8), lambda w: gk.SAMG(mapper=ThresholdMapper(2 * w / 3, 1.6 * w, q=0.5)))
    add("samg smooth σ=1 px", (1.05, 1.2), lambda w: gk.SAMG(w=w, transforms=(GaussianSmooth(1.0), MinMax())))
    add("samg narrow [0.8w,1.2w]", (1.0, 1.15), linear(0.8, 1.2))
    add("samg wide [0.25w,2w]", (0.95, 1.1), linear(0.25, 2.0))
    add("samg bound x0, [1,3]", (0.02, 0.06), lambda k: gk.SAMG(mapper=BoundMapper(1.0, 3.0, k=k)), "K")
    # limited interval: the paper's (0.28, 5.42] and a wider band
    add("interval (0.28,5.42]", (1.1, 1.2, 1.35), lambda w: gk.Interval(gk.CFG(w)))
    add("interval (0.1,20]", (1.05, 1.2), lambda w: gk.Interval(gk.CFG(w), 0.1, 20.0))
    # APG (x0 space): eta 0, reverse momentum, norm cap 2.5 (digits scale); and without cap/momentum
    add("apg η=0 r=2.5 β=-0.5", (1.1, 1.3, 1.6), lambda w: gk.APG(w, 0.0, 2.5, -0.5))
    add("apg η=0 (no cap, no momentum)", (1.1, 1.3), lambda w: gk.APG(w, 0.0, 0.0, 0.0))
    return out


def _run_part(todo: list[Entry], settings: Settings, seeds: list[int]) -> Comparison:
    """One worker: its own bench, one thread, no progress bar; records dropped (not needed here)."""
    torch.set_num_threads(1)
    part = run_comparison(DigitsBench(), todo, settings, seeds, progress=False)
    for run in part.first_runs:
        run.records = []
    return part


def run_parallel(todo: list[Entry], settings: Settings, seeds: list[int], jobs: int) -> Comparison:
    """:func:`run_comparison` split over ``jobs`` processes; results do not depend on ``jobs``."""
    if jobs <= 1:
        torch.set_num_threads(1)
        return run_comparison(DigitsBench(), todo, settings, seeds)
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    chunks = [todo[i::jobs] for i in range(jobs)]
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        parts = list(pool.map(_run_part, chunks, [settings] * jobs, [seeds] * jobs))
    order = {id(e): k for k, e in enumerate(todo)}
    merged = Comparison(parts[0].bench, settings, tuple(seeds), list(todo))
    by_entry = {}
    for chunk, part in zip(chunks, parts, strict=True):
        for j, entry in enumerate(part.entries):
            k = order[id(chunk[j])]
            by_entry[k] = ([{**r, "index": k} for r in part.rows if r["index"] == j], part.first_runs[j], entry)
    for k in range(len(todo)):
        rows, first, _ = by_entry[k]
        merged.rows.extend(rows)
        merged.first_runs.append(first)
    return merged


def _spread(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_excess(rows: list[dict], seeds: list[int], fidelity: str, quality: str) -> dict[int, list[float]]:
    """Per entry index: its excess ``quality`` over the CFG frontier at matched ``fidelity``, one per seed."""
    out: dict[int, list[float]] = {}
    for seed in seeds:
        cfg = sorted((r for r in rows if r["seed"] == seed and r["family"] == "cfg"), key=lambda r: r["index"])
        xs, ys = [r[fidelity] for r in cfg], [r[quality] for r in cfg]
        for r in rows:
            if r["seed"] == seed:
                out.setdefault(r["index"], []).append(excess_over_frontier(r[fidelity], r[quality], xs, ys))
    return out


def _cell(mean: float, sd: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return "outside"
    return f"{mean:+.{digits}f} ± {sd:.{digits}f}" if not math.isnan(sd) else f"{mean:+.{digits}f}"


def markdown(comparison: Comparison, seeds: list[int]) -> str:
    rows = comparison.rows
    ex_acc = paired_excess(rows, seeds, "acc", "fd_test")
    ex_py = paired_excess(rows, seeds, "p_y", "fd_test")
    lines = [
        "| strategy | setting | acc | p(y\\|x) | FD test | excess FD @ acc | excess FD @ p(y\\|x) "
        "| precision | recall | \\|x\\|>1.1 | NFE |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, entry in enumerate(comparison.entries):
        mine = [r for r in rows if r["index"] == i]

        def m(key: str, mine: list[dict] = mine) -> float:
            return statistics.fmean(r[key] for r in mine)

        excess_acc = "—" if entry.family == "cfg" else _cell(*_spread(ex_acc[i]))
        excess_py = "—" if entry.family == "cfg" else _cell(*_spread(ex_py[i]))
        lines.append(
            f"| {entry.family} | {entry.strength} | {m('acc'):.3f} | {m('p_y'):.3f} | {m('fd_test'):.2f} "
            f"| {excess_acc} | {excess_py} | {m('precision'):.3f} | {m('recall'):.3f} "
            f"| {m('over_share'):.4f} | {m('nfe'):.0f} |"
        )
    return "\n".join(lines)


def family_summary(comparison: Comparison, seeds: list[int]) -> str:
    """Per family: the mean paired excess over its settings that land inside the frontier."""
    rows = comparison.rows
    ex_acc = paired_excess(rows, seeds, "acc", "fd_test")
    ex_py = paired_excess(rows, seeds, "p_y", "fd_test")
    lines = [
        "| strategy | settings inside | mean excess FD @ acc | mean excess FD @ p(y\\|x) | NFE |",
        "|---|---|---|---|---|",
    ]
    families = list(dict.fromkeys(e.family for e in comparison.entries if e.family != "cfg"))
    for fam in families:
        idx = [i for i, e in enumerate(comparison.entries) if e.family == fam]
        acc_vals = [v for i in idx for v in ex_acc[i] if not math.isnan(v)]
        py_vals = [v for i in idx for v in ex_py[i] if not math.isnan(v)]
        inside = sum(1 for i in idx if not all(math.isnan(v) for v in ex_py[i]))
        nfe = statistics.fmean(r["nfe"] for r in rows if r["index"] in idx)
        lines.append(
            f"| {fam} | {inside}/{len(idx)} | {_cell(*_spread(acc_vals))} | {_cell(*_spread(py_vals))} | {nfe:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, one thread each (default 2)")
    parser.add_argument("--only", nargs="+", help="only these families (cfg is always run)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--img", default=None, help="also copy the figures to this folder (docs/img)")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from --out/quality.json")
    args = parser.parse_args()
    require_extras("benchmark", ["sklearn", "matplotlib"])
    if args.replot:
        replot(Path(args.out), args.img)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [e for e in entries() if e.family == "cfg" or not args.only or e.family in args.only]
    settings = Settings(sampler="ddim", steps=args.steps, per_class=args.per_class, schedule="trailing")
    start = time.perf_counter()
    comparison = run_parallel(todo, settings, args.seeds, args.jobs)
    minutes = (time.perf_counter() - start) / 60
    header = (
        f"digits, DDIM {args.steps} trailing steps, {args.per_class * 10} samples x seeds {args.seeds}, "
        f"torch {torch.__version__}, {args.jobs} process(es) x 1 thread, {minutes:.1f} min wall"
    )
    table = markdown(comparison, args.seeds)
    summary = family_summary(comparison, args.seeds)
    (out / "quality.md").write_text(f"{header}\n\n{summary}\n\n{table}\n")
    (out / "quality.json").write_text(json.dumps({"header": header, "runs": comparison.rows}, indent=1) + "\n")
    print(header, summary, table, sep="\n\n")

    figures = [plot(comparison.rows, out / "quality-frontier.png", len(args.seeds), args.per_class * 10)]
    pick = [c * args.per_class for c in range(10)]
    firsts = dict(zip(range(len(todo)), comparison.first_runs, strict=True))
    shown = [i for i, e in enumerate(todo) if e.family == "cfg" or e.strength == _middle(todo, e.family)]
    grid_rows = [("test digits", comparison.bench.reference_images(1))]
    grid_rows += [(todo[i].label, firsts[i].samples[pick]) for i in shown]
    title = f"digits, DDIM {args.steps} steps: one sample per class (seed {args.seeds[0]}, the same noise in every row)"
    figures.append(image_grid(grid_rows, out / "quality-grid.png", title=title))
    if args.img:
        Path(args.img).mkdir(parents=True, exist_ok=True)
        for fig in figures:
            shutil.copy(fig, Path(args.img) / fig.name)


def plot(rows: list[dict], path: Path, seeds: int, samples: int) -> Path:
    """FD (test) against the class error ``1 - p(y|x)``, per family, means over seeds."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    means = []
    for label in labels:
        mine = [r for r in rows if r["label"] == label]
        mean = {k: statistics.fmean(r[k] for r in mine) for k in ("p_y", "fd_test")}
        means.append({**mine[0], "fidelity": mean["p_y"], "quality": mean["fd_test"]})
    title = f"digits: FD (test) vs class error, mean of {seeds} seed(s) x {samples} samples, DDIM 30"
    return frontier_plot(means, "p(y|x)", "FD (test)", path, title=title)


def replot(out: Path, img: str | None) -> None:
    """Redraw the FD plot from ``quality.json`` (no sampling)."""
    data = json.loads((out / "quality.json").read_text())
    rows = data["runs"]
    seeds = len({r["seed"] for r in rows})
    samples = int(data["header"].split(" samples")[0].split(", ")[-1])
    path = plot(rows, out / "quality-frontier.png", seeds, samples)
    if img:
        shutil.copy(path, Path(img) / path.name)


def _middle(todo: list[Entry], family: str) -> str:
    members = [e.strength for e in todo if e.family == family]
    return members[len(members) // 2]


if __name__ == "__main__":
    raise SystemExit(guarded("benchmarks/bench_quality.py", main))
