"""Loss guidance (DPS, DSG) on the embedded digits model: inverse problems and classifier guidance.

    python benchmarks/bench_loss_guidance.py                 # default: ~8 min on one thread, writes docs
    python benchmarks/bench_loss_guidance.py --per-class 2 --steps 5 --cg-per-class 2 --cg-steps 5 \\
        --iters 2 --out /tmp/lg --no-doc                     # smoke run

(a) Inverse problems (guidekit.zoo.inverse): held-out test digits are the ground truth, measured as
``y = A(x) + 0.05 z`` for box inpainting, random-50% inpainting and 2x super-resolution; the unconditional
model reconstructs them with no guidance (DDIM eta = 1), DPS over a few ``ζ`` (DDIM eta = 1) and DSG over a
few ``g_r`` (its own eta = 1 step on Euler), at 20/50/100 steps, one noise seed. Reported: PSNR (whole image
and the part the measurement misses), the RMS residual ``‖y − A(x̂)‖`` per measured entry (0.05 is the
noise), FD of the classifier features against the held-out split, classifier consistency, NFE, seconds.

(b) Classifier guidance: DPS with the shipped digits classifier (``ClassifierLoss``, inner ``CFG(1.0)``) on
the unconditional model against CFG on the class-conditional one, both DDIM eta = 1; each strength is
bisected until the class accuracy reaches a target, and FD is compared there.

Writes ``loss_guidance.json`` and ``loss_guidance.md`` into ``--out``, the figure into ``--img`` and the
section "## Loss guidance (DPS, DSG)" into docs/results.md (unless ``--no-doc``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _docs import replace_section
from torch import Tensor

import guidekit as gk
from guidekit import zoo
from guidekit.losses import ClassifierLoss
from guidekit.metrics import Reference, embed, feature_stats, frechet_distance_from_stats
from guidekit.zoo.cmdline import guarded, require_extras
from guidekit.zoo.figures import image_grid
from guidekit.zoo.inverse import TASKS, draw, held_out, held_out_reference, make_problem, method, reconstruct, scores

SECTION = "## Loss guidance (DPS, DSG)"
RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results.md"
COLUMNS = ("psnr", "psnr_missing", "residual", "fd_test", "consistency")


def inverse_runs(args: argparse.Namespace, model: Any, classifier: Any, reference: Reference) -> list[dict]:
    """Every task x method x strength x step count: one row of metrics each (and the first samples kept)."""
    truth, labels = held_out(args.per_class)
    rows = []
    for task in args.tasks:
        problem = make_problem(task, truth, labels, seed=args.seed)
        settings = [("none", 0.0)] + [("dps", z) for z in args.dps] + [("dsg", g) for g in args.dsg]
        for steps in args.steps:
            for name, param in settings:
                chosen = method(name, problem, param)
                samples, nfe, seconds = reconstruct(model, problem, chosen, steps, seed=args.seed)
                row = {"task": task, "steps": steps, "method": name, "param": param, "label": chosen.label}
                row |= scores(problem, samples, classifier, reference) | {"nfe": nfe, "seconds": seconds}
                row["samples"] = samples
                rows.append(row)
                print(f"{task:15s} {steps:4d} {chosen.label:12s} PSNR {row['psnr']:.2f} cons {row['consistency']:.2f}")
    return rows


def truth_row(args: argparse.Namespace, classifier: Any, reference: Reference) -> dict[str, float]:
    """FD and consistency of the ground truth itself (the floor at this sample count)."""
    truth, labels = held_out(args.per_class)
    feats, logits = embed(classifier, truth)
    fd = frechet_distance_from_stats(*feature_stats(feats), *reference.stats)
    return {"fd_test": fd, "consistency": float((logits.argmax(1) == labels).double().mean())}


def bisect(run: Callable[[float], dict[str, float]], target: float, lo: float, hi: float, iters: int) -> dict:
    """Bisect a strength in ``[lo, hi]`` (accuracy rising with it there) towards ``target`` class accuracy;
    returns the evaluated point closest to the target."""
    tried = []
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        point = {"strength": mid, **run(mid)}
        tried.append(point)
        lo, hi = (mid, hi) if point["acc"] < target else (lo, mid)
    return min(tried, key=lambda p: (abs(p["acc"] - target), p["strength"]))


def classifier_guidance(args: argparse.Namespace, model: Any, classifier: Any, reference: Reference) -> list[dict]:
    """DPS(ClassifierLoss) on the unconditional model vs CFG on the conditional model, at matched accuracy."""
    labels = torch.arange(10).repeat_interleave(args.cg_per_class)
    n = len(labels)

    def measure(samples: Tensor, nfe: int, seconds: float) -> dict[str, float]:
        feats, logits = embed(classifier, samples.clamp(-1, 1))
        return {
            "acc": float((logits.argmax(1) == labels).double().mean()),
            "p_y": float(logits.softmax(1).gather(1, labels[:, None]).mean()),
            "fd_test": frechet_distance_from_stats(*feature_stats(feats), *reference.stats),
            "nfe": nfe,
            "seconds": seconds,
        }

    def dps(zeta: float) -> dict[str, float]:
        strategy = gk.DPS(loss=ClassifierLoss(classifier, labels), scale=zeta)
        return measure(*draw(model, strategy, n, args.cg_steps, options={"eta": 1.0}, seed=args.seed))

    def cfg(w: float) -> dict[str, float]:
        return measure(*draw(model, gk.CFG(w), n, args.cg_steps, cond=labels, options={"eta": 1.0}, seed=args.seed))

    rows = []
    for target in args.targets:
        for name, run, hi in (("CFG w", cfg, 1.0), ("DPS ζ", dps, args.dps_max)):
            point = bisect(run, target, 0.0, hi, args.iters)
            rows.append({"target": target, "method": name, **point})
            print(f"target {target}: {name}={point['strength']:.4f} acc {point['acc']:.3f} FD {point['fd_test']:.2f}")
    return rows


# -- tables and figure -------------------------------------------------------------------------------------
def _best(rows: list[dict], task: str, steps: int, name: str) -> dict:
    mine = [r for r in rows if r["task"] == task and r["steps"] == steps and r["method"] == name]
    return max(mine, key=lambda r: r["psnr"])


def summary_table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "| task | steps | none: PSNR / missing / FD / cons. | best DPS (by PSNR) | best DSG (by PSNR) |",
        "|---|---|---|---|---|",
    ]

    def cell(r: dict, named: bool = True) -> str:
        body = f"{r['psnr']:.1f} / {r['psnr_missing']:.1f} / {r['fd_test']:.0f} / {r['consistency']:.2f}"
        return f"{r['label'].split(' ', 1)[1]}: {body}" if named else body

    for task in args.tasks:
        for steps in args.steps:
            none, dps, dsg = (_best(rows, task, steps, m) for m in ("none", "dps", "dsg"))
            lines.append(f"| {task} | {steps} | {cell(none, False)} | {cell(dps)} | {cell(dsg)} |")
    return "\n".join(lines)


def md_table(header: list[str], body: list[list[str]]) -> str:
    """A markdown table of ``header`` and the rows of ``body``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(cells) + " |" for cells in body)])


def full_table(rows: list[dict]) -> str:
    header = ["task", "steps", "method", "PSNR", "PSNR missing", "residual", "FD test", "consistency", "NFE", "seconds"]
    keys = [(k, ".2f") for k in ("psnr", "psnr_missing")] + [("residual", ".3f"), ("fd_test", ".1f")]
    keys.append(("consistency", ".2f"))
    body = [
        [
            r["task"],
            str(r["steps"]),
            r["label"],
            *(format(r[k], f) for k, f in keys),
            str(r["nfe"]),
            f"{r['seconds']:.1f}",
        ]
        for r in rows
    ]
    return md_table(header, body)


def cg_table(rows: list[dict]) -> str:
    header = ["target acc", "method", "strength", "acc", "p(y\\|x)", "FD test", "NFE", "seconds"]
    keys = (("target", ".2f"), ("method", ""), ("strength", ".4f"), ("acc", ".3f"), ("p_y", ".3f"), ("fd_test", ".1f"))
    body = [[*(format(r[k], f) for k, f in keys), str(r["nfe"]), f"{r['seconds']:.1f}"] for r in rows]
    return md_table(header, body)


def figure(rows: list[dict], args: argparse.Namespace, path: Path) -> Path:
    """Ground truth, then per task: the measurement, no guidance, the best DPS and DSG (one digit per class)."""
    truth, labels = held_out(args.per_class)
    pick = [c * args.per_class for c in range(10)]
    steps = 50 if 50 in args.steps else args.steps[-1]
    grid = [("ground truth", truth[pick])]
    for task in args.tasks:
        grid.append((f"{task}: measurement", make_problem(task, truth, labels, seed=args.seed).shown()[pick]))
        for name in ("none", "dps", "dsg"):
            best = _best(rows, task, steps, name)
            grid.append((f"{task}: {best['label']}", best["samples"][pick]))
    title = f"digits, {steps} steps, noise 0.05: one held-out digit per class"
    return image_grid(grid, path, title=title)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=10, help="held-out digits per class (a): default 10")
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--dps", type=float, nargs="+", default=[0.3, 1.0, 3.0], help="DPS ζ values")
    parser.add_argument("--dsg", type=float, nargs="+", default=[0.2, 0.5, 1.0], help="DSG g_r values")
    parser.add_argument("--cg-per-class", type=int, default=20, help="samples per class (b): default 20")
    parser.add_argument("--cg-steps", type=int, default=50)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.97], help="class accuracies (b)")
    parser.add_argument("--dps-max", type=float, default=0.1, help="bisection range of DPS ζ in (b): [0, max]")
    parser.add_argument("--iters", type=int, default=6, help="bisection steps (b)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--img", default="docs/img")
    parser.add_argument("--no-doc", action="store_true", help="do not write the section into docs/results.md")
    args = parser.parse_args()
    require_extras("benchmark", ["sklearn", "matplotlib"])
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, classifier = zoo.load_denoiser(), zoo.load_classifier()
    reference = held_out_reference(classifier)
    start = time.perf_counter()
    rows = inverse_runs(args, model, classifier, reference)
    floor = truth_row(args, classifier, reference)
    cg = classifier_guidance(args, model, classifier, reference)
    minutes = (time.perf_counter() - start) / 60
    fig = figure(rows, args, Path(args.img) / "loss-guidance-grid.png")
    header = (
        f"digits, {args.per_class * 10} held-out digits (inverse problems), {args.cg_per_class * 10} samples "
        f"(classifier guidance, {args.cg_steps} steps), seed {args.seed}, torch {torch.__version__}, 1 thread, "
        f"{minutes:.1f} min wall"
    )
    tables = {
        "summary": summary_table(rows, args),
        "full": full_table(rows),
        "classifier": cg_table(cg),
        "floor": f"ground truth itself: FD test {floor['fd_test']:.1f}, consistency {floor['consistency']:.2f}",
    }
    (out / "loss_guidance.md").write_text("\n\n".join([header, *tables.values()]) + "\n")
    plain = [{k: v for k, v in r.items() if k != "samples"} for r in rows]
    record = {"header": header, "inverse": plain, "floor": floor, "classifier": cg, "args": vars(args)}
    (out / "loss_guidance.json").write_text(json.dumps(record, indent=1) + "\n")
    print(header, *tables.values(), f"figure: {fig}", sep="\n\n")
    if not args.no_doc:
        replace_section(SECTION, section(args, header, tables, minutes), doc=RESULTS)


def section(args: argparse.Namespace, header: str, tables: dict[str, str], minutes: float) -> str:
    """The docs section: command, tables; the reading is kept in docs/results.md below the marker."""
    reading_file = RESULTS.read_text() if RESULTS.exists() else ""
    marker = "<!-- reading -->"
    reading = reading_file.split(marker, 2)[1] if reading_file.count(marker) >= 2 else "\n(reading to be written)\n"
    return (
        f"{SECTION}\n\n"
        "```bash\n"
        f"python benchmarks/bench_loss_guidance.py   # {minutes:.1f} min wall, one thread\n"
        "```\n\n"
        f"{header}. Raw numbers: `benchmarks/results/loss_guidance.json`, `loss_guidance.md`.\n\n"
        "### Inverse problems: held-out digits from a noisy measurement\n\n"
        "Ground truth: the first "
        f"{args.per_class} held-out test digits of every class; measurement `y = A(x) + 0.05 z`; the model runs "
        "unconditionally (the class is not given). No guidance and DPS run on DDIM eta = 1, DSG takes its own "
        "eta = 1 step on Euler. Each cell: PSNR (dB, whole image) / PSNR of the missing part (the null space "
        "of `A`: the masked pixels; for `sr` the detail inside each 2x2 block) / FD to the held-out split / "
        "classifier consistency (the classifier's label of the reconstruction equals the digit's label). "
        f"DPS ζ over {', '.join(f'{z:g}' for z in args.dps)}; DSG g_r over {', '.join(f'{g:g}' for g in args.dsg)}; "
        f"the best by PSNR is shown ({tables['floor']}; FD at "
        f"{args.per_class * 10} samples is dominated by its small-sample bias, compare it only within this "
        "table).\n\n"
        f"{tables['summary']}\n\n"
        "![ground truth, measurement, no guidance, DPS, DSG](img/loss-guidance-grid.png)\n\n"
        "### Classifier guidance against CFG at matched accuracy\n\n"
        f"DPS with `ClassifierLoss(classifier, target=labels)` (the shipped digits classifier, inner `CFG(1.0)`) "
        f"on the unconditional model, against CFG on the class-conditional model; {args.cg_per_class * 10} "
        f"samples, DDIM eta = 1, {args.cg_steps} steps; each strength bisected ({args.iters} steps; CFG w in "
        f"[0, 1], DPS ζ in [0, {args.dps_max:g}]) towards the target class accuracy, the point nearest the target "
        "shown.\n\n"
        f"{tables['classifier']}\n\n"
        f"{marker}{reading}{marker}\n\n"
        "<details><summary>Full table (every setting)</summary>\n\n"
        f"{tables['full']}\n\n"
        "</details>\n"
    )


if __name__ == "__main__":
    raise SystemExit(guarded("benchmarks/bench_loss_guidance.py", main))
