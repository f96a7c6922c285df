"""Inverse problems on the embedded digits model: a noisy measurement of held-out digits, reconstructed with no
guidance, DPS and DSG, and measured against the ground truth (``guidekit demo --task``, the loss-guidance bench).

A *task* names a linear operator ``A`` (:mod:`guidekit.losses`): ``inpaint`` (a 4x4 box in the middle is
missing), ``inpaint-random`` (a random half of the pixels, one mask for all samples) and ``sr`` (2x
super-resolution by average pooling). The measurement is ``y = A(x) + 0.05 z`` of held-out test digits ``x``.
The model is the digits denoiser with the unconditional label (the class of ``x`` is not given).

Metrics per method (:func:`scores`): PSNR to the ground truth over the whole image and over the part the
measurement misses (the component in ``A``'s null space: the missing pixels of a mask; for ``sr`` the detail
inside each 2x2 block), the RMS residual ``‖y − A(x̂)‖ / sqrt(m)`` (the noise level 0.05 is what a perfect
reconstruction leaves), FD of the classifier features against the held-out split, and classifier
consistency (the classifier's label of the sample equals the ground truth's label).
"""

from __future__ import annotations

import argparse
import difflib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..guided import StepRecord, sample
from ..losses import Downsample, Inpaint, MeasurementLoss, Operator
from ..metrics import Reference, embed, feature_stats, frechet_distance_from_stats
from ..strategies.base import GuidanceStrategy
from ..strategies.cfg import CFG
from ..strategies.dps import DPS
from ..strategies.dsg import DSG
from .cmdline import require_extras

__all__ = [
    "DEFAULT_PARAMS",
    "METHODS",
    "NOISE",
    "TASKS",
    "Method",
    "Problem",
    "check_task",
    "draw",
    "held_out",
    "held_out_reference",
    "make_problem",
    "method",
    "reconstruct",
    "run_from_demo_args",
    "scores",
]

TASKS = ("inpaint", "inpaint-random", "sr")
"""Box inpainting, random-50% inpainting, 2x super-resolution."""

METHODS = ("none", "dps", "dsg")
NOISE = 0.05
"""Standard deviation of the measurement noise (data range ``[-1, 1]``)."""

DEFAULT_PARAMS = {
    "inpaint": {"none": 0.0, "dps": 1.0, "dsg": 0.5},
    "inpaint-random": {"none": 0.0, "dps": 1.0, "dsg": 0.5},
    "sr": {"none": 0.0, "dps": 3.0, "dsg": 0.5},
}
"""The demo's settings per task: DPS ``ζ`` and DSG ``g_r`` (the best of the bench's grids, docs/results.md)."""


def check_task(task: str, argument: str = "--task") -> str:
    """``task`` if it is one of :data:`TASKS`, else a :class:`ConfigError` naming ``argument`` and the closest."""
    if task not in TASKS:
        close = difflib.get_close_matches(str(task), TASKS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{argument}: expected one of {', '.join(TASKS)}, got {task!r}{hint}")
    return task


@dataclass(frozen=True, eq=False)
class Problem:
    """Ground truth ``truth`` (n, 1, 8, 8) with ``labels``, the operator and the noisy ``measurement``."""

    task: str
    truth: Tensor
    labels: Tensor
    operator: Operator
    measurement: Tensor
    noise: float = NOISE

    @property
    def loss(self) -> MeasurementLoss:
        """``‖y − A(x̂0)‖`` per sample: what DPS and DSG guide with."""
        return MeasurementLoss(self.operator, self.measurement)

    def null_part(self, x: Tensor) -> Tensor:
        """The component of ``x`` the measurement does not see: ``(I − A⁺A) x``."""
        if isinstance(self.operator, Inpaint):
            return x * (1 - self.operator.mask)
        assert isinstance(self.operator, Downsample)
        f = self.operator.factor
        return x - F.interpolate(self.operator(x), scale_factor=f, mode="nearest")

    @property
    def null_dim(self) -> int:
        """Dimensions of the null space per sample (missing pixels; 48 of 64 for 2x super-resolution)."""
        if isinstance(self.operator, Inpaint):
            return int((1 - self.operator.mask).expand_as(self.truth[:1]).sum())
        f = self.operator.factor  # type: ignore[attr-defined]
        return self.truth[0].numel() * (f * f - 1) // (f * f)

    def shown(self) -> Tensor:
        """The measurement as an image: missing pixels grey (0), a low-resolution one enlarged."""
        if isinstance(self.operator, Inpaint):
            mask = self.operator.mask.expand_as(self.truth)
            return torch.where(mask > 0, self.measurement, torch.zeros_like(self.measurement))
        f = self.operator.factor  # type: ignore[attr-defined]
        return F.interpolate(self.measurement, scale_factor=f, mode="nearest")


def held_out(per_class: int, argument: str = "--per-class") -> tuple[Tensor, Tensor]:
    """The first ``per_class`` held-out test digits of every class, class-major: ``(images, labels)``."""
    from . import load_digits

    images, labels = load_digits().split("test")
    most = int(torch.bincount(labels).min())
    if isinstance(per_class, bool) or not isinstance(per_class, int) or not 1 <= per_class <= most:
        raise ConfigError(
            f"{argument}: expected an integer in [1, {most}] (held-out digits of the rarest class), got {per_class!r}"
        )
    pick = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(10)])
    return images[pick], labels[pick]


def make_problem(task: str, truth: Tensor, labels: Tensor, noise: float = NOISE, seed: int = 0) -> Problem:
    """The task's operator and the measurement ``A(truth) + noise · z`` (``z`` and a random mask from ``seed``)."""
    check_task(task, "task")
    g = torch.Generator().manual_seed(seed)
    operator: Operator
    if task == "inpaint":
        mask = torch.ones(1, 1, *truth.shape[-2:])
        mask[..., 2:6, 2:6] = 0.0
        operator = Inpaint(mask)
    elif task == "inpaint-random":
        operator = Inpaint((torch.rand(1, 1, *truth.shape[-2:], generator=g) < 0.5).float())
    else:
        operator = Downsample(2)
    clean = operator(truth)
    y = clean + noise * torch.randn(clean.shape, generator=g)
    if isinstance(operator, Inpaint):
        y = operator(y)  # nothing is measured where the mask is 0
    return Problem(task, truth, labels, operator, y, noise)


@dataclass(frozen=True)
class Method:
    """A reconstruction method: its strategy and the sampler it runs on."""

    name: str
    param: float
    strategy: GuidanceStrategy
    sampler: str
    options: dict[str, Any]

    @property
    def label(self) -> str:
        if self.name == "none":
            return "none"
        return f"{self.name} {'ζ' if self.name == 'dps' else 'g_r'}={self.param:g}"


def method(name: str, problem: Problem, param: float | None = None) -> Method:
    """``none`` (DDIM eta = 1), ``dps`` with ``ζ = param`` (DDIM eta = 1) or ``dsg`` with ``g_r = param`` (on
    Euler: DSG takes the stochastic step itself)."""
    value = DEFAULT_PARAMS[problem.task][name] if param is None else float(param)
    if name == "none":
        return Method(name, value, CFG(1.0), "ddim", {"eta": 1.0})
    if name == "dps":
        return Method(name, value, DPS(loss=problem.loss, scale=value), "ddim", {"eta": 1.0})
    if name == "dsg":
        return Method(name, value, DSG(loss=problem.loss, guidance_rate=value), "euler", {})
    raise ConfigError(f"method: expected one of {', '.join(METHODS)}, got {name!r}")


def draw(
    model: Any,
    strategy: GuidanceStrategy,
    n: int,
    steps: int,
    *,
    cond: Tensor | None = None,
    uncond: Tensor | None = None,
    sampler: str = "ddim",
    options: dict[str, Any] | None = None,
    seed: int = 0,
) -> tuple[Tensor, int, float]:
    """``n`` digits from ``model`` with ``strategy`` (trailing schedule, noise from ``seed``): ``(samples, NFE per
    sample, seconds)``. ``cond``/``uncond`` default to the unconditional label ``NULL_CLASS``."""
    from .unet import NULL_CLASS

    null = torch.full((n,), NULL_CLASS)
    records: list[StepRecord] = []
    start = time.perf_counter()
    with torch.no_grad():  # the engine keeps the graph where DPS and DSG need it
        out = sample(
            model,
            torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)),
            sampler=sampler,
            steps=steps,
            strategy=strategy,
            cond=null if cond is None else cond,
            uncond=null if uncond is None else uncond,
            prediction="eps",
            alphas_cumprod=model.alphas_cumprod,
            schedule="trailing",
            progress=False,
            callback=records.append,
            sampler_options=options or None,
            generator=torch.Generator().manual_seed(seed + 1),
        )
    return out, (records[-1].nfe if records else 0), time.perf_counter() - start


def reconstruct(model: Any, problem: Problem, chosen: Method, steps: int, seed: int = 0) -> tuple[Tensor, int, float]:
    """One reconstruction per measurement, the model unconditional: ``(samples, NFE per sample, seconds)``."""
    n = problem.truth.shape[0]
    return draw(model, chosen.strategy, n, steps, sampler=chosen.sampler, options=chosen.options, seed=seed)


def _psnr(mse: Tensor) -> float:
    """Mean over samples of ``10 log10(range² / mse)``, range 2 (data in ``[-1, 1]``)."""
    return float((10 * torch.log10(4.0 / mse.clamp(min=1e-12))).mean())


def scores(problem: Problem, samples: Tensor, classifier: Any, reference: Reference) -> dict[str, float]:
    """PSNR (whole, missing part), RMS measurement residual, FD to ``reference``, classifier consistency."""
    x = samples.clamp(-1.0, 1.0)
    err = x - problem.truth
    residual = problem.measurement - problem.operator(x)
    m = residual[0].numel() if not isinstance(problem.operator, Inpaint) else int(problem.operator.mask.sum())
    feats, logits = embed(classifier, x)
    return {
        "psnr": _psnr(err.flatten(1).square().mean(1)),
        "psnr_missing": _psnr(problem.null_part(err).flatten(1).square().sum(1) / problem.null_dim),
        "residual": float((residual.flatten(1).square().sum(1) / m).sqrt().mean()),
        "fd_test": frechet_distance_from_stats(*feature_stats(feats), *reference.stats),
        "consistency": float((logits.argmax(1) == problem.labels).double().mean()),
    }


def held_out_reference(classifier: Any) -> Reference:
    """Features of the whole held-out split (FD's reference)."""
    from . import load_digits

    images, labels = load_digits().split("test")
    return Reference(embed(classifier, images)[0], labels)


# -- guidekit demo --task ------------------------------------------------------------------------------------
INVERSE_NOTE = "DDIM eta = 1 for none and DPS, Euler under DSG's own eta = 1 step"


def run_from_demo_args(args: argparse.Namespace) -> int:
    """``guidekit demo --task TASK``: reconstruct held-out digits from a noisy measurement, no guidance vs DPS
    vs DSG, and write the measurement, the grid and the metrics table into ``--out`` (all at once).

    Uses ``--task``, ``--out``, ``--force``, ``--steps``, ``--per-class`` (held-out digits per class, at most
    35), the first of ``--seeds`` (the sampling noise; the measurement noise is seed 0), ``--threads``,
    ``--quiet`` and ``--only`` (names among none, dps, dsg). Each method brings its own sampler, so
    ``--sampler`` and ``--schedule`` must stay at their defaults (ddim, trailing).
    """
    from .output import INVERSE_OUTPUTS, StagedOutput
    from .threads import torch_threads

    task = check_task(args.task)
    names = list(args.only or METHODS)
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ConfigError(f"--only: expected names among {', '.join(METHODS)} with --task, got {', '.join(unknown)}")
    for option, default in (("sampler", "ddim"), ("schedule", "trailing")):
        if getattr(args, option) != default:
            raise ConfigError(
                f"--{option}: expected the default {default!r} with --task (each method brings its own sampler: "
                f"{INVERSE_NOTE}), got {getattr(args, option)!r}"
            )
    require_extras("demo --task", ["matplotlib", "sklearn"])
    truth, labels = held_out(args.per_class)
    with StagedOutput(args.out, INVERSE_OUTPUTS, args.force) as folder, torch_threads(args.threads):
        table = write_demo(folder, task, truth, labels, names, args.steps, args.seeds[0], quiet=args.quiet)
    if not args.quiet:
        print(table)
        print("\nwrote " + ", ".join(str(Path(args.out) / name) for name in INVERSE_OUTPUTS))
    return 0


def write_demo(
    folder: Path, task: str, truth: Tensor, labels: Tensor, names: list[str], steps: int, seed: int, quiet: bool
) -> str:
    """Run the methods ``names`` on ``task`` and write ``INVERSE_OUTPUTS`` into ``folder``; return the table."""
    from . import load_classifier, load_denoiser
    from .figures import image_grid
    from .report import format_table

    model, classifier = load_denoiser(), load_classifier()
    reference = held_out_reference(classifier)
    problem = make_problem(task, truth, labels)
    if not quiet:
        print(f"guidekit demo --task {task}: {len(truth)} held-out digits, noise {problem.noise}, {steps} steps "
              f"({INVERSE_NOTE})")  # fmt: skip
    rows, shown = [], []
    for name in names:
        chosen = method(name, problem, DEFAULT_PARAMS[task][name])
        samples, nfe, seconds = reconstruct(model, problem, chosen, steps, seed=seed)
        rows.append({"label": chosen.label, **scores(problem, samples, classifier, reference), "nfe": nfe,
                     "seconds": seconds})  # fmt: skip
        shown.append((chosen.label, samples))
    table = format_table(rows, ["psnr", "psnr_missing", "residual", "fd_test", "consistency", "nfe", "seconds"])
    per_class = len(truth) // 10
    pick = [c * per_class for c in range(10)]
    title = f"{task}, noise {problem.noise}, {steps} steps: one held-out digit per class"
    grid = [("ground truth", truth[pick]), ("measurement", problem.shown()[pick])]
    image_grid(grid, folder / "measurement.png")
    image_grid(grid + [(label, s[pick]) for label, s in shown], folder / "grid.png", title=title)
    torch.save({"measurement": problem.measurement, "truth": truth, "labels": labels, "task": task,
                "noise": problem.noise}, folder / "measurement.pt")  # fmt: skip
    (folder / "metrics.txt").write_text(table + "\n")
    meta = {"task": task, "noise": problem.noise, "steps": steps, "seed": seed, "samplers": INVERSE_NOTE,
            "digits": len(truth), "rows": rows}  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(meta, indent=1) + "\n")
    return table
