"""Learned guidance weights on the Gaussian-mixture oracle: learned ω against the best constant CFG scale.

    python benchmarks/bench_learned_weight_gmm.py --out /tmp/lw_gmm

For three mixtures (``GaussianMixture.random(3, 2, (2, 1, 1), seed=m)``, m = 0, 1, 2) and two conditional
models (exact; ``leak = 0.5``, pulled halfway toward the unconditional mixture), ω is trained with the
default recipe (seed m) and sampled with DDIM and Heun at 10 and 20 steps. For every configuration and
evaluation seed the best constant CFG scale is searched on a grid (0.5 .. 4 by 0.25) *on that seed*, and
both are scored by the mean per-class energy distance to exact class samples (500 per class). Writes
``learned_weight_gmm.json`` and ``learned_weight_gmm.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from guidekit.strategies.learned_weight import LearnedWeight, save_guidance_weights
from guidekit.zoo.train_guidance import GMMTestbed, GuidanceRecipe, best_constant, gmm_distance, train_guidance

SCALES = [0.5 + 0.25 * i for i in range(15)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixtures", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, folder = [], Path(tempfile.mkdtemp())
    start = time.perf_counter()
    for mixture in args.mixtures:
        for leak in (0.0, 0.5):
            testbed = GMMTestbed.small(leak=leak, seed=mixture)
            result = train_guidance(testbed, GuidanceRecipe(seed=mixture))
            learned = LearnedWeight(str(save_guidance_weights(result.net, folder / f"{mixture}-{leak}")))
            for sampler in ("ddim", "heun"):
                for steps in (10, 20):
                    for seed in args.seeds:
                        scale, best = best_constant(testbed, SCALES, steps, args.per_class, seed, sampler=sampler)
                        mine = gmm_distance(testbed, learned, steps, args.per_class, seed, sampler=sampler)
                        rows.append(
                            {
                                "mixture": mixture,
                                "leak": leak,
                                "sampler": sampler,
                                "steps": steps,
                                "seed": seed,
                                "train_seconds": result.seconds,
                                "learned": mine,
                                "best_constant": best,
                                "best_scale": scale,
                            }
                        )
                    print(rows[-1])
    lines = [
        f"{len(args.seeds)} seeds x {args.per_class} samples per class; {(time.perf_counter() - start) / 60:.1f} min",
        "",
        "| mixture | conditional model | sampler | steps | ED learned | ED best constant (scale) | gap, every seed "
        "| learned better on |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["mixture"], r["leak"], r["sampler"], r["steps"]), []).append(r)
    for (mixture, leak, sampler, steps), mine in groups.items():
        learned = [r["learned"] for r in mine]
        best = [r["best_constant"] for r in mine]
        scales = sorted({r["best_scale"] for r in mine})
        gaps = [b - a for a, b in zip(learned, best, strict=True)]
        model = "exact" if leak == 0 else f"leak {leak:g}"
        lines.append(
            f"| {mixture} | {model} | {sampler} | {steps} | {statistics.fmean(learned):.4f} "
            f"| {statistics.fmean(best):.4f} ({', '.join(f'{s:g}' for s in scales)}) "
            f"| {', '.join(f'{g:+.4f}' for g in gaps)} | {sum(g > 0 for g in gaps)}/{len(gaps)} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "learned_weight_gmm.json").write_text(json.dumps(rows, indent=1))
    (out / "learned_weight_gmm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
