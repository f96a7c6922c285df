"""Run a comparison of strategies on a bench and write its outputs (table, grid, plot, scale maps)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GuidekitError
from ..strategies.base import GuidanceStrategy
from .compare import Bench, Run, Settings
from .figures import frontier_plot, image_grid, scale_map_strip
from .sweeps import label as strategy_label

__all__ = ["Comparison", "Entry", "format_table", "run_comparison", "write_outputs"]


@dataclass(frozen=True)
class Entry:
    """One strategy of a comparison: its ``family`` (a plot line), ``strength`` (a point label) and itself."""

    family: str
    strength: str
    strategy: GuidanceStrategy

    @property
    def label(self) -> str:
        return f"{self.family} {self.strength}".strip()

    @classmethod
    def of(cls, strategy: GuidanceStrategy) -> Entry:
        """An entry named from the strategy's spec: family = registry name, strength = its non-default params."""
        name, _, rest = strategy_label(strategy).partition(" ")
        return cls(name, rest, strategy)


@dataclass
class Comparison:
    """Results of :func:`run_comparison`: one row per (entry, seed), and the seed-0 runs (samples, records)."""

    bench: Bench
    settings: Settings
    seeds: tuple[int, ...]
    entries: list[Entry]
    rows: list[dict[str, Any]] = field(default_factory=list)
    first_runs: list[Run] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    """Entry label -> why it could not run on this model (only with ``skip_failures``)."""

    def summary(self) -> list[dict[str, Any]]:
        """Rows averaged over seeds (``<metric>_sd`` the spread across seeds when there are several)."""
        out = []
        for i, entry in enumerate(self.entries):
            rows = [r for r in self.rows if r["index"] == i]
            merged: dict[str, Any] = {"family": entry.family, "strength": entry.strength, "label": entry.label}
            for key in (*self.bench.columns, "nfe", "seconds"):
                values = [float(r[key]) for r in rows]
                merged[key] = sum(values) / len(values)
                if len(values) > 1:
                    mean = merged[key]
                    merged[f"{key}_sd"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            out.append(merged)
        return out


def run_comparison(
    bench: Bench,
    entries: Sequence[Entry],
    settings: Settings,
    seeds: Sequence[int] = (0,),
    progress: bool = True,
    on_run: Callable[[Entry, Run], None] | None = None,
    skip_failures: bool = False,
) -> Comparison:
    """Sample and measure every entry at every seed (same noise per seed for all entries), with a bar.

    With ``skip_failures`` an entry whose strategy raises a :class:`~guidekit.errors.GuidekitError` on
    this model (e.g. a flow-only option on an eps model) is dropped and noted in ``failed``.
    """
    from tqdm.auto import tqdm

    result = Comparison(bench, settings, tuple(seeds), [])
    with tqdm(total=len(entries) * len(seeds), desc=f"{bench.name}", disable=not progress, unit="run") as bar:
        for entry in entries:
            i = len(result.entries)
            try:
                runs = []
                for seed in seeds:
                    bar.set_postfix_str(f"{entry.label} seed={seed}"[:48])
                    runs.append(bench.run(entry.strategy, settings, seed=seed, record_scale_maps=seed == seeds[0]))
                    bar.update(1)
            except GuidekitError as exc:
                if not skip_failures:
                    raise
                result.failed[entry.label] = str(exc)
                bar.update(len(seeds) - len(runs))
                continue
            result.entries.append(entry)
            for seed, run in zip(seeds, runs, strict=True):
                row = {"index": i, "family": entry.family, "strength": entry.strength, "label": entry.label}
                result.rows.append({**row, "seed": seed, **run.metrics})
                if seed == seeds[0]:
                    result.first_runs.append(run)
                if on_run is not None:
                    on_run(entry, run)
    return result


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table (the label first, then ``columns``); ``<col>_sd`` entries are shown as ``±``."""
    header = ["strategy", *columns]
    body = []
    for r in rows:
        cells = [r["label"]]
        for c in columns:
            cell = _fmt(r[c])
            if f"{c}_sd" in r:
                cell += f"±{_fmt(r[f'{c}_sd'])}"
            cells.append(cell)
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    lines = [line(header), "  ".join("-" * w for w in widths), *(line(b) for b in body)]
    return "\n".join(lines)


def _spatial(run: Run) -> bool:
    """Whether the run recorded scale maps that vary over space (not one scale per sample)."""
    maps = [r.scale_map for r in run.records if r.scale_map is not None]
    if not maps:
        return False
    flat = maps[len(maps) // 2].flatten(1)
    return flat.shape[1] > 1 and bool((flat.amax(1) - flat.amin(1) > 1e-6).any())


def write_outputs(comparison: Comparison, out: Path, title: str = "", grid_per_class: int = 1) -> dict[str, Path]:
    """Write ``metrics.csv`` (per seed), ``metrics.json`` (settings, per-seed rows, summary), ``grid.png``,
    ``frontier.png`` and one ``scale-maps-<family>.png`` per spatially guided family; return the paths."""
    bench, settings = comparison.bench, comparison.settings
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    summary = comparison.summary()
    columns = ["label", "family", "strength", "seed", *bench.columns, "nfe", "seconds"]
    paths["csv"] = out / "metrics.csv"
    with paths["csv"].open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(comparison.rows)
    paths["json"] = out / "metrics.json"
    meta = {
        "model": bench.name,
        "settings": vars(settings) | {"seeds": list(comparison.seeds)},
        "quality": bench.quality,
        "fidelity": bench.fidelity,
        "strategies": [{"label": e.label, "spec": _spec(e.strategy)} for e in comparison.entries],
        "summary": summary,
        "runs": comparison.rows,
    }
    paths["json"].write_text(json.dumps(meta, indent=2) + "\n")

    per_class = settings.per_class
    pick = [c * per_class + i for c in range(bench.num_classes) for i in range(min(grid_per_class, per_class))]
    rows = [(bench.reference_name, bench.reference_images(max(grid_per_class, 1))[: len(pick)])]
    rows += [(e.label, run.samples[pick]) for e, run in zip(comparison.entries, comparison.first_runs, strict=True)]
    what = f"{bench.name}: one sample per class (seed {comparison.seeds[0]}, same noise in every row)"
    paths["grid"] = image_grid(rows, out / "grid.png", title=title or what)

    plot_rows = [{**r, "fidelity": r[bench.fidelity], "quality": r[bench.quality]} for r in summary]
    paths["frontier"] = frontier_plot(
        plot_rows, bench.fidelity, bench.quality, out / "frontier.png",
        title=f"{bench.name}: {bench.quality} vs class error, {settings.sampler} {settings.steps} steps, "
        f"{per_class * bench.num_classes} samples x {len(comparison.seeds)} seed(s)",
    )  # fmt: skip
    shown: set[str] = set()
    strip_samples = [c * per_class for c in range(0, bench.num_classes, max(1, bench.num_classes // 4))][:4]
    for entry, run in _middle_runs(comparison):
        if entry.family in shown or not _spatial(run):
            continue
        shown.add(entry.family)
        path = out / f"scale-maps-{_slug(entry.family)}.png"
        title = f"{entry.label}: per-point guidance scale over the steps"
        paths[f"scale-maps-{entry.family}"] = scale_map_strip(
            run.records, run.samples, strip_samples, path, title, labels=run.labels
        )
    return paths


def _middle_runs(comparison: Comparison) -> list[tuple[Entry, Run]]:
    """Each family's middle strength first (the most telling scale map), then the others."""
    pairs = list(zip(comparison.entries, comparison.first_runs, strict=True))
    families: dict[str, list[tuple[Entry, Run]]] = {}
    for pair in pairs:
        families.setdefault(pair[0].family, []).append(pair)
    return [members[len(members) // 2] for members in families.values()] + pairs


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name)


def _spec(strategy: GuidanceStrategy) -> Any:
    from ..config import to_spec

    try:
        return to_spec(strategy).model_dump()
    except Exception:
        return repr(strategy)
