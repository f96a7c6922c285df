"""``guidekit demo --video``: strategies side by side on the moving-digits video model.

For each strategy (CFG, SAMG with clip-wide and with per-frame energy normalisation, APG, limited-interval
CFG) it samples the same class-balanced clips from the same noise, writes an animated GIF and a frame
strip (PNG: one row per clip, one column per frame), and a metrics table (Markdown and JSON) beside the
same numbers for real test clips.

    python -m guidekit.zoo.video.demo --out video-demo --scale 3
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...energy import MinMax
from ...errors import ConfigError
from ...metrics.video import video_metrics
from ...strategies import APG, CFG, SAMG, GuidanceStrategy, Interval
from ..cmdline import counts, guarded, require_extras, seeds
from ..output import VIDEO_OUTPUTS, StagedOutput
from ..threads import torch_threads
from .data import make_clips
from .run import EvalSetting, balanced_labels, real_reference, sample_clips

__all__ = [
    "COLUMNS",
    "demo_strategies",
    "main",
    "run_from_demo_args",
    "run_video_demo",
    "write_gif",
    "write_strip",
]

COLUMNS = ("acc", "p_y", "fd", "mc_diff", "mc_rel", "flicker", "switch", "over_share", "sat")
"""Metric columns of the table, in order (see :func:`guidekit.metrics.video.video_metrics`)."""

REAL_SEED = 1000
"""The "real" row shows fresh test clips (seed ``REAL_SEED + seed``), not the reference clips themselves."""

CLIP_NUMEL = 1 * 8 * 16 * 16
"""Elements of one clip; APG's norm threshold is moved to it from SDXL's latent (``APG.threshold_for``)."""

MODULES = ("sklearn", "PIL")
"""What the video demo imports: the source digits and the GIF writer (the ``demo`` extra)."""


def demo_strategies(scale: float = 3.0) -> dict[str, GuidanceStrategy]:
    """The compared strategies around one base scale ``w``.

    SAMG uses the ``[2w/3, 1.6w]`` range rule (methods.md §3.2); APG the paper's SDXL setting (``eta=0``,
    momentum ``-0.5``, ``r = 15`` moved to this clip size); Interval guides ``sigma in (0.28, 5.42]``.
    """
    return {
        "cfg": CFG(scale),
        "samg-clip": SAMG(w=scale),
        "samg-frame": SAMG(w=scale, transforms=(MinMax(over="frame"),)),
        "apg": APG(scale=scale, eta=0.0, norm_threshold=APG.threshold_for(15.0, CLIP_NUMEL), momentum=-0.5),
        "interval": Interval(CFG(scale), sigma_lo=0.28, sigma_hi=5.42),
    }


def _to_uint8(clips: Tensor) -> np.ndarray:
    """``(n, 1, f, h, w)`` in ``[-1, 1]`` (clamped) -> ``(n, f, h, w)`` uint8."""
    x = clips.detach().float().clamp(-1.0, 1.0)[:, 0]
    return ((x + 1.0) * 127.5).round().to(torch.uint8).numpy()


def _grid(frames: np.ndarray, columns: int, pad: int = 1) -> np.ndarray:
    """``(n, h, w)`` tiles -> one ``(rows*(h+pad)-pad, cols*(w+pad)-pad)`` image with grey separators."""
    n, h, w = frames.shape
    rows = math.ceil(n / columns)
    out = np.full((rows * (h + pad) - pad, columns * (w + pad) - pad), 96, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        out[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = frames[i]
    return out


def write_gif(clips: Tensor, path: str | Path, columns: int = 10, zoom: int = 4, ms_per_frame: int = 160) -> Path:
    """An animated GIF of clips ``(n, 1, f, h, w)``: a grid of ``columns`` clips, all playing together."""
    from PIL import Image

    video = _to_uint8(clips)
    images = []
    for t in range(video.shape[1]):
        grid = _grid(video[:, t], min(columns, video.shape[0]))
        images.append(Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST))
    path = Path(path)
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0)
    return path


def write_strip(clips: Tensor, path: str | Path, zoom: int = 4) -> Path:
    """A PNG with one row per clip and one column per frame."""
    from PIL import Image

    video = _to_uint8(clips)
    n, f, h, w = video.shape
    grid = _grid(video.reshape(n * f, h, w), f)
    path = Path(path)
    Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST).save(path)
    return path


def _table(rows: Mapping[str, Mapping[str, float]]) -> str:
    head = "| strategy | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 1) + "|"]
    for name, metrics in rows.items():
        cells = [f"{metrics[c]:.4g}" if c in metrics else "–" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_video_demo(
    out: str | Path,
    strategies: Mapping[str, GuidanceStrategy] | None = None,
    setting: EvalSetting | None = None,
    reference_clips: int = 200,
    checkpoints: str | Path | None = None,
    progress: bool | None = None,
) -> dict[str, dict[str, float]]:
    """Sample every strategy on the same clips, write ``<name>.gif``, ``<name>_strip.png`` and the tables.

    Returns ``{name: metrics}``, first ``"real"``: as many real test clips as samples, disjoint from the
    reference clips, which gives the floor of every metric at this sample size. Writes ``metrics.md`` and
    ``metrics.json`` (with the setting) into ``out``.
    """
    from tqdm.auto import tqdm

    from . import load_classifier, load_denoiser

    setting = EvalSetting(per_class=3) if setting is None else setting
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, classifier = load_denoiser(checkpoints), load_classifier(checkpoints)
    strategies = demo_strategies() if strategies is None else strategies
    reference, _ = real_reference(classifier, clips=reference_clips)
    labels = balanced_labels(setting.per_class)
    real = make_clips(len(labels), seed=REAL_SEED + setting.seed, split="test", labels=labels).video
    rows = {"real": video_metrics(real, labels, classifier, reference)}
    write_gif(real, out / "real.gif")
    write_strip(real, out / "real_strip.png")
    bar = tqdm(strategies.items(), desc="video demo", disable=None if progress is None else not progress)
    for name, strategy in bar:
        clips = sample_clips(
            model, labels, strategy, steps=setting.steps, sampler=setting.sampler, seed=setting.seed,
            layout=setting.layout,
        )  # fmt: skip
        rows[name] = video_metrics(clips, labels, classifier, reference, layout=setting.layout)
        canonical = clips if setting.layout == "b c f h w" else clips.transpose(1, 2)
        write_gif(canonical, out / f"{name}.gif")
        write_strip(canonical, out / f"{name}_strip.png")
    (out / "metrics.md").write_text(_table(rows))
    record = {
        "setting": {**setting.__dict__, "reference_clips": reference.clips},
        "strategies": {name: repr(s) for name, s in strategies.items()},
        "metrics": rows,
    }
    (out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry of the video demo (``guidekit demo --video`` forwards its options here)."""
    parser = argparse.ArgumentParser(prog="guidekit demo --video", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return guarded("python -m guidekit.zoo.video.demo", lambda: run_from_args(args))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The video demo's options (shared with ``guidekit demo --video``)."""
    parser.add_argument("--out", default="guidekit-video-demo", help="output directory")
    parser.add_argument("--force", action="store_true", help="replace an earlier run in --out (other files stay)")
    parser.add_argument("--scale", type=float, default=3.0, help="base guidance scale w of every strategy")
    parser.add_argument("--per-class", type=int, default=3, help="clips per digit class")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps")
    parser.add_argument("--sampler", default="euler", help="sampler name (guidekit.samplers; euler = DDIM here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", default="b c f h w", choices=("b c f h w", "b f c h w"))
    parser.add_argument("--reference-clips", type=int, default=200, help="real test clips in the reference")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see docs)")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo from parsed :func:`add_arguments` options and print the table."""
    counts(args, "per_class", "steps", "reference_clips", "threads")
    seeds("--seed", [args.seed])
    strategies = demo_strategies(args.scale)
    setting = EvalSetting(args.per_class, args.steps, args.sampler, args.seed, args.layout)
    rows = _staged_run(args, strategies, setting, args.reference_clips, progress=None)
    print(_table(rows), end="")
    print(f"wrote GIFs, frame strips and metrics to {args.out}/")
    return 0


def run_from_demo_args(args: argparse.Namespace) -> int:
    """``guidekit demo --video``: the video demo with the image demo's options (checked by the caller).

    Uses ``--out``, ``--force``, ``--sampler``, ``--steps``, ``--per-class``, the first of ``--seeds``,
    ``--threads`` (default 1), ``--quiet`` and ``--only`` (names among :func:`demo_strategies`);
    ``--schedule`` does not apply (the video model is an EDM denoiser and samples on Karras' schedule).
    The base scale is 3.
    """
    strategies = demo_strategies()
    if args.only:
        unknown = sorted(set(args.only) - set(strategies))
        if unknown:
            raise ConfigError(f"--only: expected names among {sorted(strategies)} with --video, got {unknown}")
        strategies = {name: strategies[name] for name in args.only}
    setting = EvalSetting(args.per_class, args.steps, args.sampler, args.seeds[0])
    rows = _staged_run(args, strategies, setting, 200, progress=not args.quiet)
    if not args.quiet:
        print(_table(rows), end="")
        print(f"wrote GIFs, frame strips and metrics to {args.out}/")
    return 0


def _staged_run(
    args: argparse.Namespace,
    strategies: Mapping[str, GuidanceStrategy],
    setting: EvalSetting,
    reference_clips: int,
    progress: bool | None,
) -> dict[str, dict[str, float]]:
    """:func:`run_video_demo` into ``args.out`` all at once, after the dependency and ``--out`` checks."""
    require_extras("demo --video", MODULES)
    with StagedOutput(args.out, VIDEO_OUTPUTS, args.force) as folder, torch_threads(args.threads):
        return run_video_demo(folder, strategies, setting, reference_clips, progress=progress)


if __name__ == "__main__":
    raise SystemExit(main())
