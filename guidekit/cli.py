"""The ``guidekit`` command: ``demo``, ``compare``, ``sweep``, ``list``, ``train`` and ``train-guidance``.

Errors a user can make (unknown names, bad parameters or numbers, unreadable spec files, output folders
that cannot be written, a missing optional dependency) end with a one-line message on stderr and exit
code 2, never a traceback; they are checked before any sampling or training. A run's files appear in
``--out`` all together or not at all (:mod:`guidekit.zoo.output`); an earlier run there needs ``--force``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .zoo.cmdline import counts, guarded, out_folder, require_extras, seeds

__all__ = ["main", "parse_strategy"]

DEFAULT_OUT = "guidekit-out"

DEMO_MODULES = ("matplotlib", "sklearn")
"""What the image demo and ``compare`` import: the figures and the digits data (the ``demo`` extra)."""


class CLIError(ConfigError):
    """A user error: printed as ``guidekit: error: <message>``, exit code 2."""


def parse_strategy(text: str) -> Any:
    """A strategy from the command line: a JSON spec, ``name``, or ``name:key=value,key=value``.

    Values are read as JSON when they parse (``scale=3``, ``inner={"name":"cfg"}``), else as strings.
    """
    from .config import build

    text = text.strip()
    if text.startswith("{"):
        try:
            spec: Any = _loads(text, text)
        except json.JSONDecodeError as exc:
            raise CLIError(
                f'--strategy: expected a JSON spec {{"name": ..., "params": ...}}, got {text!r} ({exc})'
            ) from None
    else:
        name, _, rest = text.partition(":")
        pairs: list[tuple[str, Any]] = []
        for item in _split_params(rest):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise CLIError(f"--strategy: expected key=value after '{name}:', got {item!r} in {text!r}")
            try:
                pairs.append((key.strip(), _loads(value, text)))
            except json.JSONDecodeError:
                pairs.append((key.strip(), value))
        spec = {"name": name.strip(), "params": _unique(pairs, text)}
    return build(spec, where="strategy")


def _unique(pairs: list[tuple[str, Any]], text: str) -> dict[str, Any]:
    """``dict(pairs)``, refusing a key given twice (which would otherwise keep the last value silently)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise CLIError(f"--strategy: expected each key once, got {key!r} twice in {text!r}")
        seen.add(key)
    return dict(pairs)


def _loads(value: str, text: str) -> Any:
    """JSON whose objects may not repeat a key (``text``: the whole option, for the message)."""
    return json.loads(value, object_pairs_hook=lambda pairs: _unique(pairs, text))


def _split_params(text: str) -> list[str]:
    """Split ``a=1,b={"x":1,"y":2}`` at the commas outside brackets and quotes."""
    parts, depth, quote, current = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += ch
    if current.strip():
        parts.append(current)
    return parts


def _check_numbers(args: argparse.Namespace) -> None:
    """The counts and seeds of a run, before any work (argparse only checks that they are integers)."""
    if args.per_class is None:  # the model's default: 20 per digit; 4 per glyphs prompt (50 prompts, 200 samples)
        args.per_class = 4 if getattr(args, "model", "digits") == "glyphs" else 20
    counts(args, "steps", "per_class", "threads")
    seeds("--seeds", args.seeds)


def _settings(args: argparse.Namespace) -> Any:
    from .zoo.compare import Settings

    return Settings(sampler=args.sampler, steps=args.steps, per_class=args.per_class, schedule=args.schedule)


def _write_run(comparison: Any, folder: Path) -> tuple[str, list[str]]:
    """Write the outputs and ``metrics.txt`` into ``folder``; return the table and the file names."""
    from .zoo.report import format_table, write_outputs

    paths = write_outputs(comparison, folder)
    table = format_table(comparison.summary(), [*comparison.bench.columns, "nfe", "seconds"])
    (folder / "metrics.txt").write_text(table + "\n")
    return table, ["metrics.txt", *(p.name for p in paths.values())]


def _report(table: str, out: str, names: list[str], quiet: bool) -> None:
    if not quiet:
        print(table)
        print("\nwrote " + ", ".join(str(Path(out) / name) for name in names))


# -- commands ------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    """Every registered strategy over a small sweep of strengths on the embedded digits model."""
    _check_numbers(args)
    if args.model == "glyphs":
        if args.video or args.task is not None:
            what = "--video" if args.video else f"--task {args.task}"
            raise CLIError(f"--model: expected digits with {what} (it runs on the digits models), got 'glyphs'")
        from .zoo.glyphs.demo import run_from_demo_args as run_glyphs

        return run_glyphs(args)
    if args.task is not None:
        if args.video:
            raise CLIError(f"--task: expected no --video (inverse problems run on the image model), got {args.task!r}")
        from .zoo.inverse import run_from_demo_args as run_task

        return run_task(args)
    if args.video:
        from .zoo.video.demo import run_from_demo_args

        return run_from_demo_args(args)
    require_extras("demo", DEMO_MODULES)
    from .zoo.compare import DigitsBench
    from .zoo.output import IMAGE_OUTPUTS, StagedOutput
    from .zoo.report import Entry, run_comparison
    from .zoo.sweeps import default_sweeps
    from .zoo.threads import torch_threads

    settings = _settings(args)
    sweeps, skipped = default_sweeps(args.only or None)
    entries = [Entry(sw.name, f"{sw.param}={s:g}", sw.make(s)) for sw in sweeps for s in sw.strengths]
    with StagedOutput(args.out, IMAGE_OUTPUTS, args.force) as folder, torch_threads(args.threads):
        if not args.quiet:
            print(f"guidekit demo: {len(entries)} settings of {len(sweeps)} strategies on the digits model, "
                  f"{settings.per_class * 10} samples each, {settings.sampler} {settings.steps} steps")  # fmt: skip
            for name, why in skipped.items():
                print(f"  skipped {name}: {why}")
        comparison = run_comparison(
            DigitsBench(), entries, settings, args.seeds, progress=not args.quiet, skip_failures=True
        )
        if not args.quiet:
            for label, why in comparison.failed.items():
                print(f"  failed {label}: {why}")
        if not comparison.entries:
            raise CLIError("demo: expected at least one strategy that runs on the digits model, got none")
        table, names = _write_run(comparison, folder)
    _report(table, args.out, names, args.quiet)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """The strategies given on the command line or in spec files, side by side."""
    from .config import build, load_spec

    strategies = [parse_strategy(s) for s in args.strategy or []]
    for path in args.spec or []:
        try:
            spec = load_spec(path)
        except UnicodeDecodeError as exc:
            raise CLIError(
                f"--spec: expected a UTF-8 JSON or TOML file, got {path!r}, which is not text "
                f"(byte {exc.object[exc.start]:#04x} at offset {exc.start})"
            ) from None
        strategies.append(build(spec, where=f"spec file {str(path)!r}"))
    if not strategies:
        raise CLIError("compare: expected at least one --strategy or --spec, got none")
    _check_numbers(args)
    require_extras("compare", DEMO_MODULES)
    from .zoo.compare import DigitsBench, GMMBench
    from .zoo.output import IMAGE_OUTPUTS, StagedOutput
    from .zoo.report import Entry, run_comparison
    from .zoo.threads import torch_threads

    settings = _settings(args)
    entries = [Entry.of(s) for s in strategies]
    with StagedOutput(args.out, IMAGE_OUTPUTS, args.force) as folder, torch_threads(args.threads):
        if args.model == "glyphs":
            from .zoo.glyphs.bench import GlyphsBench

            bench: Any = GlyphsBench()
        else:
            bench = GMMBench() if args.model == "gmm" else DigitsBench()
        comparison = run_comparison(bench, entries, settings, args.seeds, progress=not args.quiet)
        table, names = _write_run(comparison, folder)
    _report(table, args.out, names, args.quiet)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """A grid of strategies x scales x seeds from a JSON/TOML file, sharded over the ranks of a torchrun or
    accelerate job, one atomic file per cell, resumable; rank 0 merges into compare's outputs."""
    from .zoo.sweep import bench_for, describe_missing, load_sweep, merge, missing, run_cells, wait_for, world_position

    grid = load_sweep(args.spec, parse_strategy)
    counts(args, "threads")
    if not args.wait >= 0:
        raise CLIError(f"--wait: expected a number of seconds >= 0, got {args.wait:g}")
    rank, world = world_position()
    require_extras("sweep", DEMO_MODULES)
    from .zoo.output import IMAGE_OUTPUTS, StagedOutput
    from .zoo.threads import torch_threads

    out = out_folder("--out", args.out)
    if args.ray is not None and world > 1:
        raise CLIError(f"--ray: expected one driver process (Ray runs the cells), got WORLD_SIZE={world}")
    bench = None
    with torch_threads(args.threads):
        if not args.merge_only:
            total, done = len(grid.cells()), len(grid.cells()) - len(missing(grid, out))
            if not args.quiet:
                where = "Ray" if args.ray is not None else f"rank {rank} of {world}"
                print(f"guidekit sweep: {where}, {total} cells, {done} done earlier", file=sys.stderr)
            if args.ray is not None:
                from .zoo.sweep_ray import run_cells_ray

                run_cells_ray(grid, out, args.ray or None, args.threads, progress=not args.quiet)
            else:
                bench = bench_for(grid.model)
                run_cells(bench, grid, out, rank, world, progress=not args.quiet)
        if rank != 0:
            return 0
        waited = args.wait if world > 1 and not args.merge_only else 0.0
        left = wait_for(grid, out, waited, progress=world > 1 and not args.quiet)
        if left:
            raise CLIError(
                f"sweep: {describe_missing(grid, out, left)} after waiting {waited:g} s; run the same command "
                "again to finish them (finished cells are kept)"
            )
        comparison = merge(bench or bench_for(grid.model), grid, out)
        with StagedOutput(args.out, IMAGE_OUTPUTS, force=True) as folder:  # the merged files, all at once
            table, names = _write_run(comparison, folder)
    _report(table, args.out, names, args.quiet)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Registered components of every group, with where each comes from (code or a plugin)."""
    from .registry import REGISTRIES

    groups = [args.group] if args.group else list(REGISTRIES)
    for group in groups:
        registry = REGISTRIES[group]
        names = registry.names()
        print(f"{group} ({len(names)}):")
        for name in names:
            obj = registry.get(name)
            where = registry.origin(name)
            if where == "code" and hasattr(obj, "__qualname__"):
                where = f"{obj.__module__}.{obj.__qualname__}"
            summary = (obj.__doc__ or "").strip().splitlines()[0] if obj.__doc__ else ""
            print(f"  {name:20s} {where}")
            if summary and args.verbose:
                print(f"  {'':20s} {summary}")
        for name, why in registry.broken.items():
            print(f"  {name:20s} BROKEN plugin: {why}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Retrain the embedded digits models (``python -m guidekit.zoo.train``)."""
    from .zoo.train import main as train_main

    return train_main(args.train_args)  # reached only through build_parser() users; main() delegates first


def cmd_train_guidance(args: argparse.Namespace) -> int:
    """Train learned guidance weights ω(c, s, t) for a frozen denoiser (``python -m guidekit.zoo.train_guidance``)."""
    from .zoo.train_guidance import main as train_guidance_main

    return train_guidance_main(args.train_args)  # like train: main() delegates first


# -- parser --------------------------------------------------------------------------------------------
def _add_run_options(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    p.add_argument("--sampler", default="ddim", help="any registered sampler (guidekit list samplers); default ddim")
    p.add_argument("--steps", type=int, default=steps, help=f"sampler steps (default {steps})")
    p.add_argument("--schedule", default="trailing", help="noise schedule name (default trailing, as DDIM)")
    p.add_argument(
        "--per-class", type=int, default=None,
        help="samples per class (default 20 per digit; with --model glyphs 4 per prompt, 200 samples)",
    )  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="noise seeds, shared by all strategies")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for this tiny model)")
    p.add_argument("--force", action="store_true", help="replace an earlier run in --out (other files stay)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no table on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guidekit", description="Compare diffusion guidance strategies.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,compare,sweep,list,train,train-guidance}")

    demo = sub.add_parser("demo", help=cmd_demo.__doc__, description=cmd_demo.__doc__)
    _add_run_options(demo, steps=12)
    demo.add_argument(
        "--model", choices=["digits", "glyphs"], default="digits",
        help="embedded model (default digits; glyphs: 16x16 prompt-conditional glyphs with attention)",
    )  # fmt: skip
    demo.add_argument("--only", nargs="+", metavar="NAME", help="only these registered strategies")
    demo.add_argument("--video", action="store_true", help="the moving-digits video model instead (GIFs + metrics)")
    demo.add_argument(
        "--task", metavar="TASK",
        help="an inverse problem instead: inpaint, inpaint-random or sr (no guidance vs DPS vs DSG on held-out digits)",
    )  # fmt: skip
    demo.set_defaults(func=cmd_demo)

    compare = sub.add_parser("compare", help=cmd_compare.__doc__, description=cmd_compare.__doc__)
    compare.add_argument(
        "--strategy", "-s", action="append", metavar="SPEC",
        help="'cfg:scale=3', 'samg:w_min=1,w_max=3' or a JSON spec '{\"name\": \"apg\", \"params\": {...}}'",
    )  # fmt: skip
    compare.add_argument("--spec", action="append", metavar="FILE", help="a JSON or TOML spec file (repeatable)")
    compare.add_argument(
        "--model", choices=["digits", "gmm", "glyphs"], default="digits", help="embedded model (default digits)"
    )
    _add_run_options(compare, steps=20)
    compare.set_defaults(func=cmd_compare)

    sweep = sub.add_parser("sweep", help=cmd_sweep.__doc__, description=cmd_sweep.__doc__)
    sweep.add_argument("spec", metavar="SPEC", help="a JSON or TOML sweep file (docs/cli.md#guidekit-sweep)")
    sweep.add_argument("--out", default=DEFAULT_OUT, help=f"output folder, reused to resume (default ./{DEFAULT_OUT})")
    sweep.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    sweep.add_argument("--wait", type=float, default=3600.0, help="seconds rank 0 waits for the other ranks' cells")
    sweep.add_argument("--merge-only", action="store_true", help="only merge finished cells into the outputs")
    sweep.add_argument(
        "--ray", nargs="?", const="", metavar="ADDRESS",
        help="run the cells as Ray tasks (a cluster's ADDRESS; none: RAY_ADDRESS or a local Ray); needs guidekit[ray]",
    )  # fmt: skip
    sweep.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no table on stdout")
    sweep.set_defaults(func=cmd_sweep)

    lister = sub.add_parser("list", help=cmd_list.__doc__, description=cmd_list.__doc__)
    groups = ["strategies", "energy", "transforms", "mappers", "samplers", "scale-functions"]  # REGISTRIES' keys
    lister.add_argument("group", nargs="?", choices=groups)
    lister.add_argument("-v", "--verbose", action="store_true", help="also print each one's summary line")
    lister.set_defaults(func=cmd_list)

    train = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__, add_help=False)
    train.add_argument("train_args", nargs=argparse.REMAINDER)
    train.set_defaults(func=cmd_train)
    tg_help = cmd_train_guidance.__doc__
    train_guidance = sub.add_parser("train-guidance", help=tg_help, description=tg_help, add_help=False)
    train_guidance.add_argument("train_args", nargs=argparse.REMAINDER)
    train_guidance.set_defaults(func=cmd_train_guidance)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``guidekit`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # every option belongs to the training script (argparse's REMAINDER drops "-h")
        from .zoo.train import main as train_main

        return guarded("guidekit", lambda: train_main(argv[1:]))
    if argv[:1] == ["train-guidance"]:
        from .zoo.train_guidance import main as train_guidance_main

        return train_guidance_main(argv[1:])
    args = build_parser().parse_args(argv)
    return guarded("guidekit", lambda: args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
