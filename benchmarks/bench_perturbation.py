"""Perturbation and attention guidance on the glyphs model (self- and cross-attention): quality, measured.

    python benchmarks/bench_perturbation.py                       # 3 seeds x 500 samples (about 25 min, 2 jobs)
    python benchmarks/bench_perturbation.py --per-class 4 --seeds 0 --steps 10 --out /tmp/p   # smoke run

Three studies, each against CFG on the same noise per seed (DDIM, trailing steps):

1. **Prompted** (full prompts ``[digit, texture]``): PAG, SEG, SAG, S-CFG (each with CFG 3 inside, at two
   perturbation scales) and NAG (with CFG 3) as the *paired excess FD over the CFG frontier* at matched
   p(prompt|x) and at matched prompt accuracy, the way ``bench_quality.py`` reports SAMG: negative is
   better than CFG at the same prompt adherence. NFE per sample beside it.
2. **Without a prompt** (every prompt token null): PAG, SEG and SAG need no prompt, so they run with
   ``CFG(1)`` inside (one conditional forward plus the perturbed one); reported against the plain
   unconditional sampler, FD and the high-pass spectral error.
3. **Negative prompt** (digit-only prompts, negative texture ``dots``): CFG with the negative prompt as its
   unconditional branch (2 forwards) against NAG with CFG 1 (one forward carrying the negative context) and
   the run without a negative: the rate of the excluded texture, digit accuracy, FD and NFE.

The perturbed layers are the glyphs U-net's documented names (``mid.self_attn``; NAG every
``*.cross_attn``). Writes ``perturbation.json`` and ``perturbation.md`` into ``--out`` and, unless
``--no-write``, the section "Perturbation guidance" of docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _docs import replace_section
from bench_quality import _cell, _spread, paired_excess

import guidekit as gk
from guidekit.zoo.cmdline import guarded, require_extras
from guidekit.zoo.compare import Settings
from guidekit.zoo.report import Comparison, Entry, run_comparison

SECTION = "## Perturbation guidance"
DOC = Path(__file__).resolve().parents[1] / "docs" / "results.md"
CFG_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
SELF = ("mid.self_attn",)
W = 3.0
"""CFG scale inside the perturbation strategies of the prompted study."""


def prompted_entries() -> list[Entry]:
    out = [Entry("cfg", f"w={s:g}", gk.CFG(s)) for s in CFG_SCALES]
    inner = gk.CFG(W)
    for s in (1.0, 3.0):
        out.append(Entry(f"pag + cfg {W:g}", f"s={s:g}", gk.PAG(inner, s, SELF)))
        out.append(Entry(f"seg + cfg {W:g}", f"s={s:g}", gk.SEG(inner, s, SELF)))
        out.append(Entry(f"sag + cfg {W:g}", f"s={s / 4:g}", gk.strategies.get("sag")(inner, s / 4, layers=SELF)))
    if "s-cfg" in gk.strategies.names():
        out.append(Entry("s-cfg", f"w={W:g}", gk.strategies.get("s-cfg")(scale=W)))
    out.append(Entry(f"nag + cfg {W:g}", "φ=3", gk.strategies.get("nag")(inner, 3.0)))
    return out


def unprompted_entries() -> list[Entry]:
    out = [Entry("unconditional", "", gk.CFG(1.0))]
    for s in (1.0, 3.0):
        out.append(Entry("pag", f"s={s:g}", gk.PAG(gk.CFG(1.0), s, SELF)))
        out.append(Entry("seg", f"s={s:g}", gk.SEG(gk.CFG(1.0), s, SELF)))
        out.append(Entry("sag", f"s={s / 4:g}", gk.strategies.get("sag")(gk.CFG(1.0), s / 4, layers=SELF)))
    return out


def negative_entries() -> list[tuple[Entry, dict[str, Any]]]:
    watch = {"free_texture": True, "watch": "dots"}
    negative = {"negative": "dots"}
    out = [(Entry("no negative", f"cfg w={s:g}", gk.CFG(s)), watch) for s in (1.0, W)]
    out += [(Entry("cfg, negative prompt", f"w={s:g}", gk.CFG(s)), negative) for s in (1.5, W)]
    out += [(Entry("nag, cfg 1", f"φ={p:g}", gk.strategies.get("nag")(gk.CFG(1.0), p)), negative) for p in (3.0, 5.0)]
    return out


def make_bench(kwargs: dict[str, Any]) -> Any:
    from guidekit.zoo.glyphs.bench import GlyphsBench

    return GlyphsBench(**kwargs)


def _run(todo: list[Entry], settings: Settings, seeds: list[int], kwargs: dict[str, Any]) -> Comparison:
    torch.set_num_threads(1)
    part = run_comparison(make_bench(kwargs), todo, settings, seeds, progress=False)
    for run in part.first_runs:
        run.records = []
    return part


Job = tuple[list[Entry], dict[str, Any], Settings]


def run_all(jobs: list[Job], seeds: list[int], workers: int) -> list[Comparison]:
    """Every ``(entries, bench kwargs, settings)`` job, in ``workers`` processes (one thread each)."""
    if workers <= 1:
        return [_run(todo, settings, seeds, kw) for todo, kw, settings in jobs]
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_run, todo, settings, seeds, kw) for todo, kw, settings in jobs]
        return [f.result() for f in futures]


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return statistics.fmean(values) if values else math.nan


def _by_label(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows per setting (``label``), in the order the settings ran."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["label"], []).append(r)
    return out


def _paired(mine: list[dict], base: list[dict], key: str, digits: int) -> str:
    """``key`` minus the baseline's on the same seed (same noise), mean ± sd over seeds."""
    by_seed = {r["seed"]: r[key] for r in base}
    diffs = [r[key] - by_seed[r["seed"]] for r in mine if r["seed"] in by_seed]
    return _cell(*_spread(diffs), digits) if diffs else "—"


def prompted_table(rows: list[dict], seeds: list[int]) -> str:
    """Per setting: fidelity, FD, texture error; the excess over the CFG frontier at matched fidelity, and the
    paired difference to CFG at the inner scale ``W`` (the same noise, the strategy without its extra term)."""
    ex_p, ex_acc = paired_excess(rows, seeds, "p_y", "fd"), paired_excess(rows, seeds, "acc", "fd")
    groups = _by_label(rows)
    inner = groups[f"cfg w={W:g}"]
    lines = [
        f"| strategy | setting | acc | p(prompt\\|x) | FD | spec err | Δp vs cfg {W:g} | ΔFD vs cfg {W:g} "
        f"| Δspec err vs cfg {W:g} | excess FD @ p | excess FD @ acc | NFE |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mine in groups.values():
        first, i = mine[0], mine[0]["index"]
        cells = ["—"] * 5
        if first["family"] != "cfg":
            cells = [
                _paired(mine, inner, "p_y", 3),
                _paired(mine, inner, "fd", 1),
                _paired(mine, inner, "spec_err", 3),
                _cell(*_spread(ex_p[i]), 1),
                _cell(*_spread(ex_acc[i]), 1),
            ]
        lines.append(
            f"| {first['family']} | {first['strength']} | {_mean(mine, 'acc'):.3f} | {_mean(mine, 'p_y'):.3f} "
            f"| {_mean(mine, 'fd'):.1f} | {_mean(mine, 'spec_err'):.3f} | "
            + " | ".join(cells)
            + f" | {_mean(mine, 'nfe'):.0f} |"
        )
    return "\n".join(lines)


def plain_table(rows: list[dict], columns: tuple[str, ...], baseline: str | None = None) -> str:
    """Means ± seed spread of ``columns`` per setting; with ``baseline`` (a label), the paired difference of
    the first column to it on the same seeds."""
    groups = _by_label(rows)
    delta = [f"Δ{columns[0]} vs {baseline}"] if baseline else []
    head = ["strategy", "setting", *columns, *delta, "NFE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, mine in groups.items():
        cells = []
        for key in columns:
            mean, sd = _spread([r[key] for r in mine if key in r])
            cells.append("—" if math.isnan(mean) else f"{mean:.3f} ± {sd:.3f}")
        if baseline:
            cells.append("—" if label == baseline else _paired(mine, groups[baseline], columns[0], 3))
        first = mine[0]
        lines.append(
            f"| {first['family']} | {first['strength']} | " + " | ".join(cells) + f" | {_mean(mine, 'nfe'):.0f} |"
        )
    return "\n".join(lines)


def render(header: str, rows: dict[str, list[dict]], seeds: list[int]) -> str:
    return "\n\n".join(
        [
            "**1. Prompted** (50 full prompts; Δ: paired with CFG at the inner scale on the same noise; excess: over "
            "the CFG frontier at matched fidelity; mean ± sd over seeds):\n\n"
            + prompted_table(rows["prompted"], seeds),
            "**2. Without a prompt** (all tokens null, CFG 1 inside; FD against held-out glyphs of every prompt):\n\n"
            + plain_table(rows["unprompted"], ("fd", "spec_err", "sat"), baseline="unconditional"),
            "**3. Negative prompt `texture=dots`** (digit-only prompts; `neg_rate`: share of dotted samples):\n\n"
            + plain_table(rows["negative"], ("neg_rate", "digit_acc", "fd")),
        ]
    )


def measure(args: argparse.Namespace) -> tuple[str, dict[str, list[dict]]]:
    """Run the three studies; the header line and the rows of each."""
    settings = Settings(sampler="ddim", steps=args.steps, per_class=args.per_class, schedule="trailing")
    digit_only = Settings(sampler="ddim", steps=args.steps, per_class=5 * args.per_class, schedule="trailing")
    unprompted = {"free_texture": True, "unprompted": True}
    groups: dict[tuple, list[Entry]] = {}
    for entry, kw in negative_entries():
        groups.setdefault(tuple(sorted(kw.items())), []).append(entry)
    jobs: list[Job] = [(prompted_entries(), {}, settings), (unprompted_entries(), unprompted, digit_only)]
    jobs += [(todo, dict(key), digit_only) for key, todo in groups.items()]
    start = time.perf_counter()
    prompted, plain, *negative = run_all(jobs, args.seeds, args.jobs)
    minutes = (time.perf_counter() - start) / 60
    header = (
        f"glyphs, DDIM {args.steps} trailing steps, {50 * args.per_class} samples per study and seed (50 prompts, "
        f"or 10 digits x {5 * args.per_class}) x seeds {args.seeds}, torch "
        f"{torch.__version__}, {args.jobs} process(es) x 1 thread, {minutes:.1f} min wall"
    )
    return header, {
        "prompted": prompted.rows,
        "unprompted": plain.rows,
        "negative": [r for c in negative for r in c.rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=10, help="samples per prompt (50 prompts; default 10)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, one thread each (default 2)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/results.md")
    parser.add_argument("--render", action="store_true", help="only redraw the tables from --out/perturbation.json")
    args = parser.parse_args()
    require_extras("benchmark", ["sklearn", "matplotlib"])
    if args.per_class < 1 or args.steps < 1:
        raise gk.ConfigError(f"--per-class, --steps: expected positive integers, got {args.per_class}, {args.steps}")
    out = Path(args.out)
    command = (
        f"python benchmarks/bench_perturbation.py --per-class {args.per_class} --steps {args.steps} "
        f"--seeds {' '.join(map(str, args.seeds))}"
    )
    if args.render:
        data = json.loads((out / "perturbation.json").read_text())
        header, rows, command = data["header"], data["runs"], data.get("command", command)
    else:
        out.mkdir(parents=True, exist_ok=True)
        header, rows = measure(args)
        record = {"header": header, "command": command, "runs": rows}
        (out / "perturbation.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    body = render(header, rows, args.seeds)
    (out / "perturbation.md").write_text(f"{header}\n\n{body}\n")
    print(header, body, sep="\n\n")
    if not args.no_write:
        replace_section(SECTION, f"{SECTION}\n\n`{command}`: {header}.\n\n{body}\n", DOC)


if __name__ == "__main__":
    raise SystemExit(guarded("benchmarks/bench_perturbation.py", main))
