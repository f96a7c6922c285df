"""Quality benchmark on an embedded model (digits or glyphs): every strategy against the CFG frontier.

    python benchmarks/bench_quality.py                  # full run: 1000 samples x 3 seeds, 30 DDIM steps
    python benchmarks/bench_quality.py --per-class 10 --seeds 0 --steps 10 --out /tmp/q   # smoke run
    python benchmarks/bench_quality.py --model glyphs   # SAMG's regime study on the glyphs model (docs/results.md)

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
from guidekit.energy import (
    BoundMapper,
    DeltaScore,
    DeltaSquared,
    GaussianSmooth,
    LinearMapper,
    MinMax,
    ThresholdMapper,
    X0DeltaSquared,
)
from guidekit.metrics import excess_over_frontier
from guidekit.zoo.cmdline import guarded, require_extras
from guidekit.zoo.compare import Bench, DigitsBench, Settings
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


GLYPHS_CFG_SCALES = {"high": (1.0, 1.5, 2.0, 3.0, 4.0, 6.0), "mid": (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)}
"""The CFG frontier of each glyphs range: ``high`` reaches the scales where texture saturates; ``mid`` is
dense where the prompt fidelity still moves (p(prompt|x) 0.89 to 0.99), so matched comparisons are
well-conditioned there."""


def glyphs_entries(strengths: str = "high") -> list[Entry]:
    """SAMG's regime study on the glyphs model: the CFG frontier, SAMG with the published direction, the
    mirrored control and the curvature-bound mapper, then CFG's neighbours (APG, Interval(CFG), the ramp
    and TV-CFG schedules). ``strengths="high"``: SAMG at w = 2, 3 and the others at 3 (where CFG saturates
    the texture), the bound mapper with each energy estimator; ``"mid"``: SAMG at w = 1.25, 1.5, the others
    at 1.5 (Interval at 2, as it guides only part of the steps), the bound mapper with the x0 energy.

    On one channel and with the default per-sample min-max, the three energy estimators give the *same*
    scale map (they differ by a per-sample factor, which the normalisation removes), so the linear
    mappers run with the default estimator only; the bound mapper reads absolute energy, so it runs with
    each, its ``K = (w - 1) sqrt(E_med)`` so that ``Ω = w`` at the median energy ``E_med`` over the middle
    half of the steps of a 20-step run on the 50 prompts (measured on the shipped model), clipped to
    ``[1, 2w]``.
    """
    if strengths not in GLYPHS_CFG_SCALES:
        raise ValueError(f"strengths: expected one of {sorted(GLYPHS_CFG_SCALES)}, got {strengths!r}")
    high = strengths == "high"
    samg_w, other_w = ((2.0, 3.0), (3.0,)) if high else ((1.25, 1.5), (1.5,))
    out = [Entry("cfg", f"w={s:g}", gk.CFG(s)) for s in GLYPHS_CFG_SCALES[strengths]]

    def add(family: str, strengths: tuple[float, ...], make: Callable[[float], gk.GuidanceStrategy]) -> None:
        out.extend(Entry(family, f"w={s:g}", make(s)) for s in strengths)

    add("samg published [2w/3,1.6w]", samg_w, lambda w: gk.SAMG(w=w))
    add("samg mirrored (control)", samg_w, lambda w: gk.SAMG(mapper=LinearMapper(2 * w / 3, 1.6 * w, "increasing")))
    for name, energy, root in BOUND_ROOT_ENERGY if high else BOUND_ROOT_ENERGY[:1]:
        add(
            f"samg bound {name}",
            other_w,
            lambda w, e=energy, r=root: gk.SAMG(energy=e, mapper=BoundMapper(1.0, 2 * w, k=(w - 1) * r)),
        )
    add("apg η=0 r=2.5 β=-0.5", other_w, lambda w: gk.APG(w, 0.0, 2.5, -0.5))
    add("interval (0.28,5.42]", other_w if high else (2.0,), lambda w: gk.Interval(gk.CFG(w)))
    add("ramp (linear, mean w)", other_w, lambda w: gk.strategies.get("ramp")(inner=gk.CFG(w)))
    add("tv-cfg (mean w)", other_w, lambda w: gk.strategies.get("tv-cfg")(inner=gk.CFG(w)))
    return out


BOUND_ROOT_ENERGY: tuple[tuple[str, object, float], ...] = (
    ("x0-delta-sq", X0DeltaSquared(), 0.0627),
    ("delta-sq", DeltaSquared(), 0.00122),
    ("delta-score", DeltaScore(), 1.566e-6),
)
"""``(name, estimator, sqrt(E_med))`` for the bound mapper on the glyphs model (see :func:`glyphs_entries`)."""

MODELS: dict[str, dict] = {
    "digits": {"entries": entries, "quality": "fd_test", "texture": None},
    "glyphs": {"entries": glyphs_entries, "quality": "fd", "texture": "spec_err"},
}


def make_bench(model: str) -> Bench:
    if model == "glyphs":
        from guidekit.zoo.glyphs.bench import GlyphsBench

        return GlyphsBench()
    return DigitsBench()


def _run_part(todo: list[Entry], settings: Settings, seeds: list[int], model: str = "digits") -> Comparison:
    """One worker: its own bench, one thread, no progress bar; records dropped (not needed here)."""
    torch.set_num_threads(1)
    part = run_comparison(make_bench(model), todo, settings, seeds, progress=False)
    for run in part.first_runs:
        run.records = []
    return part


def run_parallel(
    todo: list[Entry], settings: Settings, seeds: list[int], jobs: int, model: str = "digits"
) -> Comparison:
    """:func:`run_comparison` split over ``jobs`` processes; results do not depend on ``jobs``."""
    if jobs <= 1:
        torch.set_num_threads(1)
        return run_comparison(make_bench(model), todo, settings, seeds)
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    chunks = [todo[i::jobs] for i in range(jobs)]
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        parts = list(pool.map(_run_part, chunks, [settings] * jobs, [seeds] * jobs, [model] * jobs))
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


def markdown(comparison: Comparison, seeds: list[int], model: str = "digits") -> str:
    if model == "glyphs":
        return markdown_glyphs(comparison, seeds)
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


def markdown_glyphs(comparison: Comparison, seeds: list[int]) -> str:
    """The glyphs table: per-head accuracy, FD and the texture metric, each excess at matched p(prompt|x)."""
    rows = comparison.rows
    ex_fd = paired_excess(rows, seeds, "p_y", "fd")
    ex_acc = paired_excess(rows, seeds, "acc", "fd")
    ex_spec = paired_excess(rows, seeds, "p_y", "spec_err")
    lines = [
        "| strategy | setting | acc | p(prompt\\|x) | digit acc | texture acc | FD | excess FD @ p | excess FD @ acc "
        "| spec err | excess spec err @ p | \\|x\\|>1 | NFE |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, entry in enumerate(comparison.entries):
        mine = [r for r in rows if r["index"] == i]

        def m(key: str, mine: list[dict] = mine) -> float:
            return statistics.fmean(r[key] for r in mine)

        cfg = entry.family == "cfg"
        cells = ["—"] * 3 if cfg else [_cell(*_spread(ex[i]), d) for ex, d in ((ex_fd, 2), (ex_acc, 2), (ex_spec, 3))]
        lines.append(
            f"| {entry.family} | {entry.strength} | {m('acc'):.3f} | {m('p_y'):.3f} | {m('digit_acc'):.3f} "
            f"| {m('texture_acc'):.3f} | {m('fd'):.2f} | {cells[0]} | {cells[1]} | {m('spec_err'):.3f} | {cells[2]} "
            f"| {m('sat'):.4f} | {m('nfe'):.0f} |"
        )
    return "\n".join(lines)


def family_summary(comparison: Comparison, seeds: list[int], model: str = "digits") -> str:
    """Per family: the mean paired excess over its settings that land inside the frontier."""
    rows = comparison.rows
    quality, texture = MODELS[model]["quality"], MODELS[model]["texture"]
    ex_acc = paired_excess(rows, seeds, "acc", quality)
    ex_py = paired_excess(rows, seeds, "p_y", quality)
    ex_tex = paired_excess(rows, seeds, "p_y", texture) if texture else {}
    lines = [
        "| strategy | settings inside | mean excess FD @ acc | mean excess FD @ p(y\\|x) "
        + ("| mean excess spec err @ p(y\\|x) " if texture else "")
        + "| NFE |",
        "|---|---|---|---|" + ("---|" if texture else "") + "---|",
    ]
    families = list(dict.fromkeys(e.family for e in comparison.entries if e.family != "cfg"))
    for fam in families:
        idx = [i for i, e in enumerate(comparison.entries) if e.family == fam]
        acc_vals = [v for i in idx for v in ex_acc[i] if not math.isnan(v)]
        py_vals = [v for i in idx for v in ex_py[i] if not math.isnan(v)]
        inside = sum(1 for i in idx if not all(math.isnan(v) for v in ex_py[i]))
        nfe = statistics.fmean(r["nfe"] for r in rows if r["index"] in idx)
        tex = ""
        if texture:
            tex_vals = [v for i in idx for v in ex_tex[i] if not math.isnan(v)]
            tex = f" {_cell(*_spread(tex_vals), 3)} |"
        cells = f"| {_cell(*_spread(acc_vals))} | {_cell(*_spread(py_vals))} |{tex}"
        lines.append(f"| {fam} | {inside}/{len(idx)} {cells} {nfe:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="digits", help="embedded model (default digits)")
    parser.add_argument("--per-class", type=int, default=None, help="default 100 per digit; 20 per glyphs prompt")
    parser.add_argument("--range", choices=sorted(GLYPHS_CFG_SCALES), default="high", help="glyphs: the strengths")
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
    model = args.model
    if args.per_class is None:
        args.per_class = 20 if model == "glyphs" else 100
    made = MODELS[model]["entries"](args.range) if model == "glyphs" else MODELS[model]["entries"]()
    todo = [e for e in made if e.family == "cfg" or not args.only or e.family in args.only]
    settings = Settings(sampler="ddim", steps=args.steps, per_class=args.per_class, schedule="trailing")
    start = time.perf_counter()
    comparison = run_parallel(todo, settings, args.seeds, args.jobs, model)
    minutes = (time.perf_counter() - start) / 60
    classes = comparison.bench.num_classes
    what = f"{model} ({args.range} strengths)" if model == "glyphs" else model
    header = (
        f"{what}, DDIM {args.steps} trailing steps, {args.per_class * classes} samples x seeds {args.seeds}, "
        f"torch {torch.__version__}, {args.jobs} process(es) x 1 thread, {minutes:.1f} min wall"
    )
    table = markdown(comparison, args.seeds, model)
    summary = family_summary(comparison, args.seeds, model)
    (out / "quality.md").write_text(f"{header}\n\n{summary}\n\n{table}\n")
    (out / "quality.json").write_text(json.dumps({"header": header, "runs": comparison.rows}, indent=1) + "\n")
    print(header, summary, table, sep="\n\n")

    samples = args.per_class * classes
    figures = [plot(comparison.rows, out / "quality-frontier.png", len(args.seeds), samples, model, args.steps)]
    if model == "glyphs":
        figures.append(
            plot(comparison.rows, out / "quality-texture.png", len(args.seeds), samples, model, args.steps, "spec_err")
        )
    # glyphs: ten prompts on a diagonal of (digit, texture), every texture twice
    classes_shown = [11 * c % 50 for c in range(10)] if model == "glyphs" else list(range(10))
    pick = [c * args.per_class for c in classes_shown]
    firsts = dict(zip(range(len(todo)), comparison.first_runs, strict=True))
    shown = [i for i, e in enumerate(todo) if e.family == "cfg" or e.strength == _middle(todo, e.family)]
    grid_rows = [(comparison.bench.reference_name, comparison.bench.reference_images(1)[classes_shown])]
    grid_rows += [(todo[i].label, firsts[i].samples[pick]) for i in shown]
    what = "prompt" if model == "glyphs" else "class"
    title = (
        f"{model}, DDIM {args.steps} steps: one sample per {what} (seed {args.seeds[0]}, the same noise in every row)"
    )
    figures.append(image_grid(grid_rows, out / "quality-grid.png", title=title))
    if args.img:
        Path(args.img).mkdir(parents=True, exist_ok=True)
        for fig in figures:
            shutil.copy(fig, Path(args.img) / fig.name)


def plot(
    rows: list[dict], path: Path, seeds: int, samples: int, model: str = "digits", steps: int = 30, quality: str = ""
) -> Path:
    """``quality`` (default FD) against the class error ``1 - p(y|x)``, per family, means over seeds."""
    quality = quality or MODELS[model]["quality"]
    names = {"fd_test": "FD (test)", "fd": "FD (held-out)", "spec_err": "high-pass spectral error"}
    labels = list(dict.fromkeys(r["label"] for r in rows))
    means = []
    for label in labels:
        mine = [r for r in rows if r["label"] == label]
        mean = {k: statistics.fmean(r[k] for r in mine) for k in ("p_y", quality)}
        means.append({**mine[0], "fidelity": mean["p_y"], "quality": mean[quality]})
    error = "prompt error" if model == "glyphs" else "class error"
    title = f"{model}: {names[quality]} vs {error}, mean of {seeds} seed(s) x {samples} samples, DDIM {steps}"
    return frontier_plot(means, "p(y|x)", names[quality], path, title=title)


def replot(out: Path, img: str | None) -> None:
    """Redraw the FD plot from ``quality.json`` (no sampling)."""
    data = json.loads((out / "quality.json").read_text())
    rows = data["runs"]
    seeds = len({r["seed"] for r in rows})
    samples = int(data["header"].split(" samples")[0].split(", ")[-1])
    model = data["header"].split(",")[0].split(" ")[0]
    path = plot(rows, out / "quality-frontier.png", seeds, samples, model if model in MODELS else "digits")
    if img:
        shutil.copy(path, Path(img) / path.name)


def _middle(todo: list[Entry], family: str) -> str:
    members = [e.strength for e in todo if e.family == family]
    return members[len(members) // 2]


if __name__ == "__main__":
    raise SystemExit(guarded("benchmarks/bench_quality.py", main))
