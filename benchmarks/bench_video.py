"""Guidance on the embedded video model: does SAMG improve temporal consistency and saturation over CFG?

    python benchmarks/bench_video.py                      # ~15-30 min on one core
    python benchmarks/bench_video.py --seeds 0 --scales 2 --per-class 2 --steps 6   # smoke run

Sweeps CFG, SAMG with clip-wide energy normalisation (``MinMax(over="sample")``), SAMG with per-frame
normalisation (``MinMax(over="frame")``), APG and limited-interval CFG over base scales ``w`` and sampling
seeds; every run samples the same class-balanced labels from the same noise (per seed). Metrics are
:func:`guidekit.metrics.video.video_metrics` against 200 real test clips. SAMG's range is ``[2w/3, 1.6w]``,
so its mean scale is not ``w``: strategies are compared both at the same ``w`` and **at matched
fidelity**, interpolating CFG's sweep linearly in ``p_y`` (the mean probability of the requested class).

Writes ``benchmarks/results/bench_video.json`` and prints Markdown tables (pasted into docs/video-results.md).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from guidekit import CFG, STG, GuidanceStrategy
from guidekit.metrics.video import video_metrics
from guidekit.zoo import video
from guidekit.zoo.cmdline import guarded, require_extras
from guidekit.zoo.video.demo import demo_strategies

KEYS = ("acc", "p_y", "fd", "mc_diff", "mc_rel", "flicker", "switch", "over_share", "over_mean", "sat")
MATCHED = ("fd", "mc_diff", "mc_rel", "flicker", "over_share", "sat")
FAMILIES = ("cfg", "samg-clip", "samg-frame", "apg", "interval", "stg-r", "stg-a")
DEFAULT_FAMILIES = FAMILIES[:5]
"""The SAMG study's families; ``--families cfg stg-r stg-a`` is STG's study (docs/video-results.md)."""


def strategies(scale: float) -> dict[str, GuidanceStrategy]:
    """The demo's strategies at base scale ``w``, and STG around ``CFG(w)``: STG-R skips the residual block
    after the space-time attention (``net.mid2``), STG-A makes that attention the identity; scale 1, ρ = 0.7."""
    return {
        **demo_strategies(scale),
        "stg-r": STG(CFG(scale), 1.0, ("net.mid2",)),
        "stg-a": STG(CFG(scale), 1.0, ("net.attn.attn",), mode="A"),
    }


ROOT = Path(__file__).resolve().parent


def sweep(args: argparse.Namespace) -> dict:
    model, classifier = video.load_denoiser(), video.load_classifier()
    reference, _ = video.real_reference(classifier)
    runs: list[dict] = []
    families = [f for f in FAMILIES if f == "cfg" or f in args.families]
    settings = [("cond", 1.0)] + [(f, w) for w in args.scales for f in families]
    start = time.perf_counter()
    for seed in args.seeds:
        setting = video.EvalSetting(args.per_class, args.steps, args.sampler, seed)
        for family, w in settings:
            strategy = None if family == "cond" else strategies(w)[family]
            metrics, _ = video.evaluate(model, classifier, reference, strategy, setting)
            runs.append({"family": family, "scale": w, "seed": seed, **metrics})
            shown = "  ".join(f"{k}={metrics[k]:.4g}" for k in ("p_y", "fd", "mc_rel", "flicker", "over_share"))
            print(f"{time.perf_counter() - start:6.0f} s  seed {seed}  {family:10s} w={w:<4} {shown}", flush=True)
    real = video.make_clips(10 * args.per_class, seed=1000, split="test", labels=video.balanced_labels(args.per_class))
    real_metrics = video_metrics(real.video, real.labels, classifier, reference)
    return {
        "setting": {
            "per_class": args.per_class, "steps": args.steps, "sampler": args.sampler, "seeds": args.seeds,
            "scales": args.scales, "reference_clips": reference.clips, "threads": torch.get_num_threads(),
        },
        "reference": {"mc_diff": reference.mc_diff, "flicker": reference.flicker},
        "real": real_metrics,
        "runs": runs,
    }  # fmt: skip


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(result: dict) -> dict[tuple[str, float], dict[str, tuple[float, float]]]:
    """``(family, scale) -> key -> (mean, std over seeds)``."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for run in result["runs"]:
        groups.setdefault((run["family"], run["scale"]), []).append(run)
    return {g: {k: _mean_std([r[k] for r in rs]) for k in KEYS} for g, rs in groups.items()}


def _interp(x: float, xs: list[float], ys: list[float]) -> float | None:
    """Piecewise-linear ``y(x)`` through sorted points; ``None`` outside their range."""
    pts = sorted(zip(xs, ys, strict=True))
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def matched(result: dict) -> list[dict]:
    """Every non-CFG run against CFG interpolated at the same ``p_y`` (same seed), per metric."""
    out = []
    for seed in result["setting"]["seeds"]:
        cfg = [r for r in result["runs"] if r["seed"] == seed and r["family"] in ("cfg", "cond")]
        for run in (r for r in result["runs"] if r["seed"] == seed and r["family"] not in ("cfg", "cond")):
            row = {"family": run["family"], "scale": run["scale"], "seed": seed, "p_y": run["p_y"]}
            for key in MATCHED:
                ref = _interp(run["p_y"], [r["p_y"] for r in cfg], [r[key] for r in cfg])
                row[key] = None if ref is None else run[key] - ref
                row[f"{key}_cfg"] = ref
            out.append(row)
    return out


def markdown(result: dict) -> str:
    agg = aggregate(result)
    s = result["setting"]
    lines = [
        f"{len(s['seeds'])} seeds x {10 * s['per_class']} clips, {s['sampler']} {s['steps']} steps; "
        f"mean ± std over seeds. Real clips (same count): " + ", ".join(f"{k}={result['real'][k]:.4g}" for k in KEYS),
        "",
        "| strategy | w | " + " | ".join(KEYS) + " |",
        "|---|---|" + "---|" * len(KEYS),
    ]
    for (family, w), m in sorted(agg.items(), key=lambda kv: (FAMILIES.index(kv[0][0]) if kv[0][0] in FAMILIES
                                                                 else -1, kv[0][1])):  # fmt: skip
        lines.append(f"| {family} | {w:g} | " + " | ".join(f"{m[k][0]:.4g} ± {m[k][1]:.2g}" for k in KEYS) + " |")
    lines += ["", "At matched fidelity (difference to CFG interpolated at the same p_y, same seed; mean ± std "
              "over seeds; negative = lower than CFG):", "",
              "| strategy | w | p_y | " + " | ".join(f"Δ{k}" for k in MATCHED) + " | n |",
              "|---|---|---|" + "---|" * len(MATCHED) + "---|"]  # fmt: skip
    rows: dict[tuple[str, float], list[dict]] = {}
    for row in matched(result):
        rows.setdefault((row["family"], row["scale"]), []).append(row)
    for (family, w), rs in sorted(rows.items(), key=lambda kv: (FAMILIES.index(kv[0][0]), kv[0][1])):
        ok = [r for r in rs if r["mc_diff"] is not None]
        if not ok:
            p = _mean_std([r["p_y"] for r in rs])[0]
            lines.append(f"| {family} | {w:g} | {p:.4g} | outside CFG's range |" + " |" * len(MATCHED) + " 0 |")
            continue
        cells = []
        for key in MATCHED:
            mean, std = _mean_std([r[key] for r in ok])
            cells.append(f"{mean:+.3g} ± {std:.2g}")
        p = _mean_std([r["p_y"] for r in ok])[0]
        lines.append(f"| {family} | {w:g} | {p:.4g} | " + " | ".join(cells) + f" | {len(ok)} |")
    return "\n".join(lines) + "\n"


def figure(path: Path, scale: float = 3.0, classes: int = 5, steps: int = 20) -> None:
    """One PNG: for ``classes`` digits (rows), real test clips then each strategy at ``scale`` (blocks of 8
    frames), all strategies from the same noise (seed 0)."""
    from PIL import Image, ImageDraw

    from guidekit.zoo.video.demo import _grid, _to_uint8

    model = video.load_denoiser()
    labels = torch.arange(classes)
    blocks = {"real": video.make_clips(classes, seed=1000, split="test", labels=labels).video}
    for name, strategy in demo_strategies(scale).items():
        blocks[name] = video.sample_clips(model, labels, strategy, steps=steps, seed=0)
    zoom, gap, head, per_row = 3, 8, 14, 3
    tiles = {name: _grid(_to_uint8(v).reshape(-1, 16, 16), 8) for name, v in blocks.items()}
    h, w = next(iter(tiles.values())).shape
    rows = -(-len(tiles) // per_row)
    canvas = Image.new("L", (per_row * (w * zoom + gap) - gap, rows * (h * zoom + head + gap) - gap), 255)
    draw = ImageDraw.Draw(canvas)
    for i, (name, tile) in enumerate(tiles.items()):
        x, y = (i % per_row) * (w * zoom + gap), (i // per_row) * (h * zoom + head + gap)
        canvas.paste(Image.fromarray(tile).resize((w * zoom, h * zoom), Image.NEAREST), (x, y + head))
        draw.text((x + 2, y + 1), name if name == "real" else f"{name} w={scale:g}", fill=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.25, 1.5, 2.0, 3.0, 4.5])
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument(
        "--families", nargs="+", choices=FAMILIES, default=list(DEFAULT_FAMILIES), help="cfg always runs"
    )
    parser.add_argument("--out", default=str(ROOT / "results" / "bench_video.json"))
    parser.add_argument("--figure", metavar="PNG", help="only draw the frame-strip figure (docs/img/...)")
    args = parser.parse_args()
    require_extras("benchmark", ["sklearn", "PIL"])
    torch.set_num_threads(1)
    if args.figure:
        figure(Path(args.figure))
        return
    result = sweep(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result), end="")


if __name__ == "__main__":
    raise SystemExit(guarded("benchmarks/bench_video.py", main))
