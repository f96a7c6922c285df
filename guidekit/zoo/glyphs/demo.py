"""``guidekit demo --model glyphs``: every registered strategy on the glyphs model, plus a negative prompt.

Every strategy family runs at one strength near CFG 3 (CFG itself at 1, 3 and 5) on the same noise; the
attention-perturbation strategies (PAG, SEG, SAG, SLG, STG, NAG) and S-CFG get this model's layer names
(:mod:`.model`). The outputs are the image demo's (``metrics.txt/.csv/.json``, ``grid.png``,
``frontier.png``, ``scale-maps-*.png``) plus ``negative.txt`` and ``negative-grid.png``: digit-only prompts
sampled with CFG 3 from the all-null unconditional branch and from the negative prompt ``texture=dots``,
with the share of dotted samples.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ...strategies.base import GuidanceStrategy
from ..compare import Settings
from ..output import IMAGE_OUTPUTS, StagedOutput
from ..report import Comparison, Entry, format_table, run_comparison, write_outputs

__all__ = ["GLYPHS_OUTPUTS", "NEGATIVE", "glyphs_entries", "run_from_demo_args", "run_negative"]

GLYPHS_OUTPUTS = (*IMAGE_OUTPUTS, "negative.txt", "negative-grid.png")
"""Names the glyphs demo writes (``fnmatch`` patterns)."""

NEGATIVE = "dots"
"""The texture the demo's negative prompt excludes."""

BASE_SCALE = 3.0
"""The CFG scale every strategy is built around (the inner CFG of the perturbation strategies)."""

SELF = ("mid.self_attn",)
"""Self-attention selector of the perturbation strategies on this model (the bottleneck's, SD's choice)."""


def _perturbation_makers() -> dict[str, tuple[str, Callable[[float], GuidanceStrategy]]]:
    """Perturbation strategies with this model's layers: ``{name: (param, make(strength))}``."""
    from ...registry import STRATEGIES
    from ...strategies import CFG

    inner = CFG(BASE_SCALE)
    makers: dict[str, tuple[str, Callable[[float], Any]]] = {
        "pag": ("scale", lambda s: STRATEGIES.get("pag")(inner=inner, scale=s, layers=SELF)),
        "seg": ("scale", lambda s: STRATEGIES.get("seg")(inner=inner, scale=s, layers=SELF)),
        "sag": ("scale", lambda s: STRATEGIES.get("sag")(inner=inner, scale=s, layers=SELF)),
        "slg": (
            "scale",
            lambda s: STRATEGIES.get("slg")(inner=inner, scale=s, layers=("mid.self_attn", "up1.self_attn")),
        ),
        "stg": ("scale", lambda s: STRATEGIES.get("stg")(inner=inner, scale=s, layers=("up1.self_attn",))),
        "nag": ("φ", lambda s: STRATEGIES.get("nag")(inner=inner, scale=s, layers=("cross_attn",))),
        "s-cfg": ("scale", lambda s: STRATEGIES.get("s-cfg")(scale=s)),  # its scale is the CFG scale
    }
    return {name: m for name, m in makers.items() if name in STRATEGIES.names()}


GLYPHS_WEIGHTS = "glyphs_learned_weight"
"""The shipped learned ω of this model (``guidekit train-guidance --testbed glyphs``): learned-weight's
default, the digits model's ω, reads class labels, not prompts."""

PERTURBATION_STRENGTHS = {"pag": 1.0, "seg": 1.0, "sag": 0.5, "slg": 1.0, "stg": 1.0, "nag": 3.0, "s-cfg": BASE_SCALE}


def glyphs_entries(names: Sequence[str] | None = None) -> tuple[list[Entry], dict[str, str]]:
    """The demo's entries (``names``: only these registered strategies) and ``{name: why skipped}``."""
    from ..sweeps import default_sweeps

    perturbed = _perturbation_makers()
    wanted = list(names) if names is not None else None
    sweeps, skipped = default_sweeps([n for n in wanted if n not in perturbed] if wanted is not None else None)
    entries: list[Entry] = []
    for sweep in sweeps:
        if sweep.name == "learned-weight":  # this model's own ω (one per prompt, shipped), as trained
            from ...strategies.learned_weight import LearnedWeight

            entries.append(Entry(sweep.name, f"{sweep.param}=1 ({GLYPHS_WEIGHTS})", LearnedWeight(GLYPHS_WEIGHTS)))
            continue
        if sweep.name == "cfg":
            strengths: tuple[float, ...] = (1.0, BASE_SCALE, 5.0)
        else:  # one strength: the one closest to the base scale (cfg++'s λ: its largest)
            strengths = (min(sweep.strengths, key=lambda s: abs(s - BASE_SCALE)),)
        entries += [Entry(sweep.name, f"{sweep.param}={s:g}", sweep.make(s)) for s in strengths]
    for name, (param, make) in perturbed.items():
        if wanted is None or name in wanted:
            skipped.pop(name, None)
            strength = PERTURBATION_STRENGTHS[name]
            inner = "" if name == "s-cfg" else f" cfg={BASE_SCALE:g}"
            entries.append(Entry(name, f"{param}={strength:g}{inner}", make(strength)))
    return entries, skipped


def run_negative(settings: Settings, seed: int, folder: Path, progress: bool) -> str:
    """CFG 3 on digit-only prompts, without and with the negative prompt; writes the table and the grid."""
    from ...strategies import CFG
    from ..figures import image_grid
    from .bench import GlyphsBench

    plain = GlyphsBench(free_texture=True, watch=NEGATIVE)
    negative = GlyphsBench(negative=NEGATIVE)
    rows: list[dict[str, Any]] = []
    grid = [(plain.reference_name, plain.reference_images(1))]
    for label, bench in (
        (f"cfg w={BASE_SCALE:g}", plain),
        (f"cfg w={BASE_SCALE:g}, negative texture={NEGATIVE}", negative),
    ):
        run = bench.run(CFG(BASE_SCALE), settings, seed=seed)
        rows.append({"label": label, **run.metrics})
        grid.append((label, run.samples[:: settings.per_class][:10]))
    columns = ["digit_acc", "p_digit", "neg_rate", "fd", "spec_err", "sat", "nfe"]
    table = format_table(rows, columns)
    (folder / "negative.txt").write_text(
        f"digit-only prompts, {settings.per_class * 10} samples, {settings.sampler} {settings.steps} steps; "
        f"neg_rate = share of samples in texture={NEGATIVE}\n\n{table}\n"
    )
    image_grid(
        grid,
        folder / "negative-grid.png",
        title=f"glyphs: CFG {BASE_SCALE:g} with the negative prompt texture={NEGATIVE}",
    )
    return table


def run_from_demo_args(args: argparse.Namespace) -> int:
    """``guidekit demo --model glyphs`` from the demo's parsed options (numbers checked by the caller)."""
    from ..cmdline import require_extras
    from ..threads import torch_threads
    from .bench import GlyphsBench

    require_extras("demo --model glyphs", ("matplotlib", "sklearn"))
    entries, skipped = glyphs_entries(args.only or None)
    if not entries:
        raise ConfigError(f"--only: expected registered strategies that run on the glyphs model, got {args.only}")
    settings = Settings(sampler=args.sampler, steps=args.steps, per_class=args.per_class, schedule=args.schedule)
    with StagedOutput(args.out, GLYPHS_OUTPUTS, args.force) as folder, torch_threads(args.threads):
        if not args.quiet:
            print(f"guidekit demo: {len(entries)} settings on the glyphs model, {settings.per_class * 50} samples "
                  f"each (50 prompts), {settings.sampler} {settings.steps} steps")  # fmt: skip
            for name, why in skipped.items():
                print(f"  skipped {name}: {why}")
        comparison: Comparison = run_comparison(
            GlyphsBench(), entries, settings, args.seeds, progress=not args.quiet, skip_failures=True
        )
        if not args.quiet:
            for label, why in comparison.failed.items():
                print(f"  failed {label}: {why}")
        if not comparison.entries:
            raise ConfigError("demo: expected at least one strategy that runs on the glyphs model, got none")
        paths = write_outputs(comparison, folder)
        table = format_table(comparison.summary(), [*comparison.bench.columns, "nfe", "seconds"])
        (folder / "metrics.txt").write_text(table + "\n")
        negative = run_negative(settings, args.seeds[0], folder, progress=not args.quiet)
        names = ["metrics.txt", *(p.name for p in paths.values()), "negative.txt", "negative-grid.png"]
    if not args.quiet:
        print(table)
        print(f"\nnegative prompt texture={NEGATIVE}:\n{negative}")
        print("\nwrote " + ", ".join(str(Path(args.out) / name) for name in names))
    return 0
