"""Train the moving-digits video denoiser and its per-frame classifier on one CPU core.

    python -m guidekit.zoo.video.train          # ~15 min on one core; writes guidekit/zoo/checkpoints/video_*

Both networks see fresh clips every step (:func:`make_clips` with a per-step seed) made from the *train*
source digits only; every figure in the JSON records is measured on clips of the held-out *test* digits.
One thread and fixed seeds: a rerun gives the same weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cmdline import counts, guarded, require_extras, writable_folder
from ..optim import ema_update, warmup_cosine
from ..store import CHECKPOINT_DIR, write_checkpoint
from .classifier import FrameClassifier
from .data import MotionConfig, make_clips
from .model import VideoDenoiser, VideoDenoiserConfig

__all__ = [
    "ClassifierRecipe",
    "DenoiserRecipe",
    "edm_loss",
    "main",
    "refresh_figures",
    "train_classifier",
    "train_denoiser",
]

P_MEAN, P_STD = -1.2, 1.2
"""EDM's log-normal training distribution of sigma (Karras et al. 2022, Table 1)."""


@dataclass(frozen=True)
class DenoiserRecipe:
    """How the video denoiser is trained: EDM loss, condition dropout, AdamW + warm-up/cosine, EMA."""

    steps: int = 2500
    batch_size: int = 32
    lr: float = 2e-3
    p_uncond: float = 0.15
    ema_decay: float = 0.998
    seed: int = 0


LR_FLOOR = 0.05
"""Both networks' learning rate decays (cosine, after a linear warm-up) to this share of its peak."""


@dataclass(frozen=True)
class ClassifierRecipe:
    """How the per-frame classifier is trained: cross-entropy on every frame of fresh clips."""

    steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0


def edm_loss(model: VideoDenoiser, x0: Tensor, labels: Tensor, gen: torch.Generator) -> Tensor:
    """``E[lambda(sigma) |D(x0 + sigma n; sigma) - x0|^2]``, ``ln sigma ~ N(P_MEAN, P_STD^2)``,
    ``lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2`` (Karras et al. 2022, eq. 2, Table 1)."""
    b = x0.shape[0]
    sigma = (torch.randn(b, generator=gen) * P_STD + P_MEAN).exp()
    noise = torch.randn(x0.shape, generator=gen)
    sd = model.config.sigma_data
    weight = ((sigma**2 + sd**2) / (sigma * sd) ** 2).view(b, 1, 1, 1, 1)
    denoised = model(x0 + sigma.view(b, 1, 1, 1, 1) * noise, sigma, labels)
    return (weight * (denoised - x0) ** 2).mean()


def _progress(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=None)


def train_denoiser(
    recipe: DenoiserRecipe = DenoiserRecipe(),
    config: VideoDenoiserConfig | None = None,
    motion: MotionConfig | None = None,
) -> VideoDenoiser:
    """Train a :class:`VideoDenoiser` with condition dropout (label -> null, Ho & Salimans 2022, Alg. 1).

    Returns the EMA weights; the EMA decay warms up as ``min(decay, (1 + k) / (10 + k))``.
    """
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    model = VideoDenoiser(config)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0, betas=(0.9, 0.99))
    bar = _progress(recipe.steps, "video denoiser")
    for k in range(recipe.steps):
        clips = make_clips(recipe.batch_size, seed=1_000_000 * (recipe.seed + 1) + k, split="train", motion=motion)
        drop = torch.rand(recipe.batch_size, generator=gen) < recipe.p_uncond
        labels = torch.where(drop, model.null_label, clips.labels)
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(k, recipe.steps, recipe.lr, min(200, recipe.steps // 10 + 1), LR_FLOOR)
        loss = edm_loss(model, clips.video, labels, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, k, recipe.ema_decay)
        bar.update(1)
        if k % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return ema.eval()


def train_classifier(recipe: ClassifierRecipe = ClassifierRecipe(), motion: MotionConfig | None = None):
    """Train :class:`FrameClassifier` on every frame of fresh train clips (``batch_size`` clips a step)."""
    torch.manual_seed(recipe.seed)
    model = FrameClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    bar = _progress(recipe.steps, "frame classifier")
    for k in range(recipe.steps):
        clips = make_clips(recipe.batch_size, seed=2_000_000 * (recipe.seed + 1) + k, split="train", motion=motion)
        b, _, f, h, w = clips.video.shape
        frames = clips.video.transpose(1, 2).reshape(b * f, 1, h, w)
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(k, recipe.steps, recipe.lr, 50, LR_FLOOR)
        loss = F.cross_entropy(model(frames), clips.labels.repeat_interleave(f))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
    bar.close()
    return model.eval().requires_grad_(False)


def main(argv: Sequence[str] | None = None) -> int:
    """Train both networks, measure them on test clips, write ``video_denoiser`` and ``video_classifier``."""
    from .figures import classifier_figures, denoiser_figures

    parser = argparse.ArgumentParser(prog="python -m guidekit.zoo.video.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="checkpoint directory (default: the package's)")
    parser.add_argument("--steps", type=int, default=DenoiserRecipe.steps, help="denoiser training steps")
    parser.add_argument("--classifier-steps", type=int, default=ClassifierRecipe.steps)
    parser.add_argument("--figures-only", action="store_true", help="re-measure the shipped weights, no training")
    args = parser.parse_args(argv)
    counts(args, "steps", "classifier_steps")  # before any work, not after minutes of it
    require_extras("train", ["sklearn"])
    writable_folder("--out", CHECKPOINT_DIR if args.out is None else args.out)
    torch.set_num_threads(1)
    if args.figures_only:
        return refresh_figures(args.out)
    command = "python -m guidekit.zoo.video.train " + " ".join(argv if argv is not None else sys.argv[1:])

    start, cpu = time.perf_counter(), time.process_time()
    c_recipe = ClassifierRecipe(steps=args.classifier_steps)
    classifier = train_classifier(c_recipe)
    c_seconds, c_cpu = time.perf_counter() - start, time.process_time() - cpu
    c_record = {
        "command": command.strip(),
        "recipe": asdict(c_recipe),
        "motion": asdict(MotionConfig()),
        "train_seconds": round(c_seconds, 1),
        "train_cpu_seconds": round(c_cpu, 1),
        "threads": 1,
        "figures": classifier_figures(classifier),
    }
    write_checkpoint(classifier, "video_classifier", c_record, args.out)
    print(f"classifier: {c_record['figures']}  ({c_seconds:.0f} s)")

    start, cpu = time.perf_counter(), time.process_time()
    d_recipe = DenoiserRecipe(steps=args.steps)
    config = VideoDenoiserConfig()
    denoiser = train_denoiser(d_recipe, config)
    d_seconds, d_cpu = time.perf_counter() - start, time.process_time() - cpu
    d_record = {
        "command": command.strip(),
        "recipe": asdict(d_recipe),
        "architecture": config.to_dict(),
        "motion": asdict(MotionConfig()),
        "parameters": sum(p.numel() for p in denoiser.parameters()),
        "train_seconds": round(d_seconds, 1),
        "train_cpu_seconds": round(d_cpu, 1),
        "threads": 1,
        "figures": denoiser_figures(denoiser, classifier),
    }
    write_checkpoint(denoiser, "video_denoiser", d_record, args.out)
    print(f"denoiser: {d_record['figures']}  ({d_seconds:.0f} s)")
    return 0


def refresh_figures(directory: str | Path | None = None) -> int:
    """Re-measure the shipped checkpoints with the current metrics and rewrite only their ``figures``."""
    from . import CLASSIFIER, DENOISER, load_classifier, load_denoiser
    from .figures import classifier_figures, denoiser_figures

    base = Path(directory) if directory is not None else CHECKPOINT_DIR
    classifier, denoiser = load_classifier(directory), load_denoiser(directory)
    for name, figures in ((CLASSIFIER, classifier_figures(classifier)), (DENOISER, None)):
        path = base / f"{name}.json"
        record = json.loads(path.read_text())
        record["figures"] = figures if figures is not None else denoiser_figures(denoiser, classifier)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"{name}: {record['figures']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(guarded("python -m guidekit.zoo.video.train", main))
