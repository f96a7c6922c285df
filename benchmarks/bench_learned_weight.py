"""Learned guidance weights on the digits model against the CFG frontier (as bench_quality.py measures).

    python benchmarks/bench_learned_weight.py                                  # 1000 samples x 3 seeds
    python benchmarks/bench_learned_weight.py --per-class 30 --out /tmp/lw     # the reduced run in docs/results.md

CFG traces the frontier of (class accuracy, FD to the test digits) over its scales; the shipped learned ω
(``learned-weight``, as trained and at twice its strength) and the reward-tilted ω are sampled from the
same noise per seed and reported as their *paired excess FD*: FD minus the CFG frontier's FD at the same
accuracy (and at the same mean p(y|x)), per seed, then mean ± sd over seeds. Negative is better than CFG.
DDIM, 30 trailing steps. Writes ``learned_weight.json`` and ``learned_weight.md`` into ``--out``.

    python benchmarks/bench_learned_weight.py --overhead    # the cost of ω per step against CFG
    python benchmarks/bench_learned_weight.py --weak        # the weak denoiser (the under-trained regime)
    python benchmarks/bench_learned_weight.py --model glyphs --per-class 4 --seeds 0 1 2   # the glyphs model

``--model glyphs``: the glyphs model's 50 full prompts ``[digit, texture]`` (``GlyphsBench``; ``--per-class``
is per prompt, default 4), CFG at ``GLYPHS_CFG_SCALES`` against its learned ω (``glyphs_learned_weight``, one
ω per prompt), paired excess FD at matched p(prompt|x) and at matched accuracy (both heads right).

``--overhead`` times, interleaved, the combine alone (batch 10 and 1000) and whole 30-step DDIM runs of the
digits model (100 samples), CFG against the learned weight, and prints medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_quality import paired_excess

import guidekit as gk
from guidekit.zoo.compare import DigitsBench, Settings
from guidekit.zoo.report import Entry, run_comparison

CFG_SCALES = (0.8, 0.9, 1.0, 1.1, 1.2, 1.5)


WEAK_CFG_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)


GLYPHS_CFG_SCALES = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5)
"""Dense where the glyphs model's prompt fidelity still moves and its FD has its minimum (bench_quality's
``mid`` range without w = 3)."""


def glyphs_entries() -> list[Entry]:
    """The glyphs model: its CFG frontier and its learned per-prompt ω (as trained and at twice its strength)."""
    out = [Entry("cfg", f"w={s:g}", gk.CFG(s)) for s in GLYPHS_CFG_SCALES]
    name = "glyphs_learned_weight"
    out += [Entry("learned-weight", f"ω×{k:g}", gk.LearnedWeight(name, omega_scale=k)) for k in (1.0, 2.0)]
    return out


def weak_entries() -> list[Entry]:
    """The weak digits denoiser (under-trained: accuracy 0.66 at w = 1): its CFG frontier and its learned ω."""
    out = [Entry("cfg", f"w={s:g}", gk.CFG(s)) for s in WEAK_CFG_SCALES]
    name = "digits_weak_learned_weight"
    out += [Entry("learned-weight", f"ω×{k:g}", gk.LearnedWeight(name, omega_scale=k)) for k in (1.0, 2.0)]
    return out


def entries() -> list[Entry]:
    out = [Entry("cfg", f"w={s:g}", gk.CFG(s)) for s in CFG_SCALES]
    out += [Entry("learned-weight", f"ω×{k:g}", gk.LearnedWeight(omega_scale=k)) for k in (1.0, 2.0)]
    out.append(Entry("learned-weight reward", "ω×1", gk.LearnedWeight("digits_learned_weight_reward")))
    return out


def cell(values: list[float]) -> str:
    if any(math.isnan(v) for v in values):
        return "outside"
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):+.2f} ± {sd:.2f}"


def _median_seconds(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def overhead(reps: int = 7) -> None:
    """Combine cost and whole-run cost of the learned weight against CFG, interleaved, one thread."""
    from guidekit.context import GuidanceContext
    from guidekit.zoo import NULL_CLASS, load_denoiser

    cfg, learned = gk.CFG(1.2), gk.LearnedWeight()
    for b in (10, 1000):
        c, u = torch.randn(b, 1, 8, 8), torch.randn(b, 1, 8, 8)
        ctx = GuidanceContext(
            sigma=torch.full((b,), 3.0), sigma_next=torch.full((b,), 2.0), condition=torch.arange(b) % 10
        )
        found: dict[str, list[float]] = {"cfg": [], "learned": []}
        for _ in range(reps):
            for name, s in (("cfg", cfg), ("learned", learned)):
                found[name].append(_median_seconds(lambda s=s, c=c, u=u, ctx=ctx: s.step(c, u, ctx, None), 200))
        a, b_ = statistics.median(found["cfg"]), statistics.median(found["learned"])
        print(f"combine, batch {b}: CFG {a * 1e6:.0f} us, learned {b_ * 1e6:.0f} us (+{(b_ - a) * 1e6:.0f} us)")
    model = load_denoiser()
    labels = torch.arange(10).repeat_interleave(10)
    noise = torch.randn(100, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = {"prediction": "eps", "alphas_cumprod": model.alphas_cumprod, "schedule": "trailing"}
    kwargs |= {"cond": labels, "uncond": torch.full_like(labels, NULL_CLASS), "progress": False, "steps": 30}
    runs: dict[str, list[float]] = {"cfg": [], "learned": []}
    with torch.no_grad():
        for _ in range(reps):
            for name, s in (("cfg", cfg), ("learned", learned)):
                runs[name].append(_median_seconds(lambda s=s: gk.sample(model, noise, strategy=s, **kwargs), 1))
    a, b_ = statistics.median(runs["cfg"]), statistics.median(runs["learned"])
    spread = max(runs["cfg"]) - min(runs["cfg"])
    print(
        f"30-step DDIM run, 100 digits: CFG {a * 1e3:.0f} ms, learned {b_ * 1e3:.0f} ms; ratio {b_ / a:.3f}; "
        f"per step +{(b_ - a) / 30 * 1e3:.2f} ms; CFG's own spread over {reps} runs {spread * 1e3:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("digits", "glyphs"), default="digits")
    parser.add_argument("--per-class", type=int, default=None, help="default 100 per digit; 4 per glyphs prompt")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--overhead", action="store_true", help="only time ω against CFG (see above)")
    parser.add_argument("--weak", action="store_true", help="the weak digits denoiser and its learned ω instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.overhead:
        overhead()
        return
    if args.per_class is None:
        args.per_class = 4 if args.model == "glyphs" else 100
    if args.model == "glyphs":
        glyphs(args)
        return
    settings = Settings(sampler="ddim", steps=args.steps, per_class=args.per_class, schedule="trailing")
    start = time.perf_counter()
    if args.weak:
        from guidekit.zoo import load_weak_denoiser

        bench, todo = DigitsBench(model=load_weak_denoiser()), weak_entries()
    else:
        bench, todo = DigitsBench(), entries()
    comparison = run_comparison(bench, todo, settings, args.seeds)
    seconds = time.perf_counter() - start
    rows = comparison.rows
    ex_acc, ex_py = paired_excess(rows, args.seeds, "acc", "fd_test"), paired_excess(rows, args.seeds, "p_y", "fd_test")
    lines = [
        f"{args.per_class * 10} samples x {len(args.seeds)} seeds, DDIM {args.steps} trailing steps, "
        f"{seconds / 60:.1f} min",
        "",
        "| strategy | setting | acc | p(y\\|x) | FD test | excess FD @ acc | excess FD @ p(y\\|x) "
        "| precision | recall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, entry in enumerate(comparison.entries):
        mine = [r for r in rows if r["index"] == i]

        def m(key: str, mine: list[dict] = mine) -> float:
            return statistics.fmean(r[key] for r in mine)

        cfg = entry.family == "cfg"
        lines.append(
            f"| {entry.family} | {entry.strength} | {m('acc'):.3f} | {m('p_y'):.3f} | {m('fd_test'):.2f} "
            f"| {'—' if cfg else cell(ex_acc[i])} | {'—' if cfg else cell(ex_py[i])} "
            f"| {m('precision'):.3f} | {m('recall'):.3f} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keep = ("index", "family", "strength", "seed", "acc", "p_y", "fd_test", "precision", "recall", "nfe", "seconds")
    stem = "learned_weight_weak" if args.weak else "learned_weight"
    (out / f"{stem}.json").write_text(
        json.dumps({"seconds": seconds, "rows": [{k: r[k] for k in keep if k in r} for r in rows]}, indent=1)
    )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def glyphs(args: argparse.Namespace) -> None:
    """``--model glyphs``: the CFG frontier against the learned per-prompt ω on the glyphs model."""
    from guidekit.zoo.glyphs.bench import GlyphsBench

    settings = Settings(sampler="ddim", steps=args.steps, per_class=args.per_class, schedule="trailing")
    start = time.perf_counter()
    comparison = run_comparison(GlyphsBench(), glyphs_entries(), settings, args.seeds)
    seconds = time.perf_counter() - start
    rows = comparison.rows
    ex_p, ex_acc = paired_excess(rows, args.seeds, "p_y", "fd"), paired_excess(rows, args.seeds, "acc", "fd")
    lines = [
        f"glyphs, {args.per_class} per prompt x 50 prompts x {len(args.seeds)} seeds, DDIM {args.steps} trailing "
        f"steps, {seconds / 60:.1f} min",
        "",
        "| strategy | setting | acc | p(prompt\\|x) | digit acc | texture acc | FD | excess FD @ p(prompt\\|x) "
        "| excess FD @ acc | spec err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, entry in enumerate(comparison.entries):
        mine = [r for r in rows if r["index"] == i]

        def m(key: str, mine: list[dict] = mine) -> float:
            return statistics.fmean(r[key] for r in mine)

        cfg = entry.family == "cfg"
        lines.append(
            f"| {entry.family} | {entry.strength} | {m('acc'):.3f} | {m('p_y'):.3f} | {m('digit_acc'):.3f} "
            f"| {m('texture_acc'):.3f} | {m('fd'):.2f} | {'—' if cfg else cell(ex_p[i])} "
            f"| {'—' if cfg else cell(ex_acc[i])} | {m('spec_err'):.3f} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keep = ("index", "family", "strength", "seed", "acc", "p_y", "digit_acc", "texture_acc", "fd", "spec_err")
    (out / "learned_weight_glyphs.json").write_text(
        json.dumps(
            {"seconds": seconds, "rows": [{k: r[k] for k in (*keep, "nfe", "seconds") if k in r} for r in rows]},
            indent=1,
        )
    )
    (out / "learned_weight_glyphs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
