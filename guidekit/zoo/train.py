"""Train the embedded digits models: ``python -m guidekit.zoo.train`` (or ``guidekit train``).

Trains, on the train split only, the evaluation classifier, the denoiser and the deliberately weak
denoiser, then measures them on the held-out split and writes safetensors + JSON records into
``guidekit/zoo/checkpoints/`` (or ``--out``). One thread, fixed seeds: a rerun gives the same weights.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .classifier import DigitsClassifier, random_shift
from .cmdline import counts, guarded, require_extras, seeds, writable_folder
from .data import DIGITS_SPLIT, DigitsSplit, load_digits
from .optim import ema_update
from .unet import NULL_CLASS, DigitsUNet

__all__ = [
    "ClassifierRecipe",
    "DenoiserRecipe",
    "classifier_accuracy",
    "main",
    "measure_denoiser",
    "train_classifier",
    "train_denoiser",
]


@dataclass(frozen=True)
class ClassifierRecipe:
    """How the evaluation classifier is trained (AdamW + cosine decay, ±1 px shifts)."""

    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0


@dataclass(frozen=True)
class DenoiserRecipe:
    """How a denoiser is trained: eps loss, condition dropout, AdamW + OneCycle, EMA of the weights."""

    channels: tuple[int, int] = (32, 64)
    emb_dim: int = 128
    steps: int = 2500
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-2
    p_uncond: float = 0.15
    ema_decay: float = 0.999
    seed: int = 0


WEAK_RECIPE = DenoiserRecipe(channels=(16, 32), emb_dim=64, steps=500, seed=1)
"""The weak denoiser (for AutoGuidance): 4x fewer parameters and 5x shorter training."""


def train_classifier(data: DigitsSplit, recipe: ClassifierRecipe = ClassifierRecipe()) -> DigitsClassifier:
    """Train :class:`DigitsClassifier` on ``data``'s train split."""
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    model = DigitsClassifier()
    x, y = data.train_images, data.train_labels
    steps_per_epoch = -(-len(y) // recipe.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.epochs * steps_per_epoch)
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), recipe.batch_size):
            idx = order[i : i + recipe.batch_size]
            loss = F.cross_entropy(model(random_shift(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval().requires_grad_(False)


def train_denoiser(data: DigitsSplit, recipe: DenoiserRecipe = DenoiserRecipe(), progress: bool = False) -> DigitsUNet:
    """Train an eps-prediction :class:`DigitsUNet`; returns the EMA weights.

    DDPM loss ``|eps - eps_theta(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, y)|^2`` with ``t`` uniform over the 1000
    steps (Ho et al. 2020, Algorithm 1) and ``y`` replaced by the null class with probability ``p_uncond``
    (Ho & Salimans 2022, Algorithm 1). The EMA decay warms up as ``min(decay, (1 + k) / (10 + k))``.
    """
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    model = DigitsUNet(recipe.channels, recipe.emb_dim)
    ema = copy.deepcopy(model).requires_grad_(False)
    alphas_cumprod = model.alphas_cumprod.to(torch.float32)
    x, y = data.train_images, data.train_labels
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps)
    bar = _progress(recipe.steps, "denoiser", progress)
    model.train()
    for k in range(recipe.steps):
        idx = torch.randint(0, len(y), (recipe.batch_size,), generator=gen)
        x0, labels = x[idx], y[idx].clone()
        labels[torch.rand(recipe.batch_size, generator=gen) < recipe.p_uncond] = NULL_CLASS
        t = torch.randint(0, model.num_timesteps, (recipe.batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, labels), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema_update(ema, model, k, recipe.ema_decay)
        bar.update(1)
        if k % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return ema.eval()


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def classifier_accuracy(model: DigitsClassifier, images: Tensor, labels: Tensor) -> float:
    """Share of ``images`` classified as ``labels``."""
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


EVAL_SETTINGS = {"sampler": "ddim", "schedule": "trailing", "steps": 30, "per_class": 100, "seed": 0}
"""How the recorded denoiser figures are measured: 1000 samples (100 per class), 30 trailing DDIM steps."""


def measure_denoiser(model: DigitsUNet, classifier: DigitsClassifier, scales: Sequence[float] = (1.0, 3.0)) -> dict:
    """Held-out figures of ``model`` with CFG at each scale (see :data:`EVAL_SETTINGS`)."""
    from ..strategies import CFG
    from .compare import DigitsBench, Settings

    bench = DigitsBench(model=model, weak_model=model, classifier=classifier)
    settings = Settings(**{k: v for k, v in EVAL_SETTINGS.items() if k != "seed"})
    out = {}
    for scale in scales:
        metrics = bench.run(CFG(scale), settings, seed=EVAL_SETTINGS["seed"]).metrics
        out[f"cfg_{scale:g}"] = {k: round(v, 4) for k, v in metrics.items() if k != "seconds"}
    return out


def _record(kind: str, recipe: Any, data: DigitsSplit, command: str, seconds: float, **extra: Any) -> dict[str, Any]:
    return {
        "model": kind,
        "training_command": command,
        "recipe": asdict(recipe),
        "data": {
            "source": "sklearn.datasets.load_digits, pixels 0..16 scaled to [-1, 1]",
            "split": DIGITS_SPLIT,
            "train": len(data.train_labels),
            "test": len(data.test_labels),
        },
        "train_seconds_one_thread": round(seconds, 1),
        "torch": torch.__version__,
        **extra,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Train the classifier, the denoiser and the weak denoiser; write checkpoints and records.

    The numbers, ``--out`` and scikit-learn are checked first: a :class:`~guidekit.errors.GuidekitError`
    names the argument (:func:`guidekit.cli.main` prints it as one line, exit code 2).
    """
    from .store import CHECKPOINT_DIR

    parser = argparse.ArgumentParser(prog="python -m guidekit.zoo.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(CHECKPOINT_DIR), help="checkpoint folder (default: the package's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the denoiser and the classifier")
    parser.add_argument("--steps", type=int, default=DenoiserRecipe.steps, help="denoiser optimiser steps")
    parser.add_argument("--weak-steps", type=int, default=WEAK_RECIPE.steps, help="weak denoiser steps")
    parser.add_argument("--classifier-epochs", type=int, default=ClassifierRecipe.epochs)
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out sampling figures")
    args = parser.parse_args(argv)
    counts(args, "steps", "weak_steps", "classifier_epochs")  # before any work, not after minutes of it
    seeds("--seed", [args.seed])
    require_extras("train", ["sklearn"])
    writable_folder("--out", args.out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reproducible and fastest for these small nets
    try:
        return _train_all(args, argv)
    finally:
        torch.set_num_threads(threads)


def _train_all(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from .store import write_checkpoint

    command = " ".join(["python -m guidekit.zoo.train", *(sys.argv[1:] if argv is None else argv)])
    data = load_digits()

    clf_recipe = ClassifierRecipe(epochs=args.classifier_epochs, seed=args.seed)
    start = time.perf_counter()
    classifier = train_classifier(data, clf_recipe)
    seconds = time.perf_counter() - start
    acc = classifier_accuracy(classifier, data.test_images, data.test_labels)
    print(f"classifier: held-out accuracy {acc:.4f} ({seconds:.0f} s)")
    record = _record("DigitsClassifier", clf_recipe, data, command, seconds, held_out={"accuracy": round(acc, 4)})
    write_checkpoint(classifier, "digits_classifier", record, args.out)

    recipes = {
        "digits_denoiser": DenoiserRecipe(steps=args.steps, seed=args.seed),
        "digits_denoiser_weak": replace(WEAK_RECIPE, steps=args.weak_steps, seed=args.seed + 1),
    }
    for name, recipe in recipes.items():
        start = time.perf_counter()
        model = train_denoiser(data, recipe, progress=True)
        seconds = time.perf_counter() - start
        arch = {"channels": list(recipe.channels), "emb_dim": recipe.emb_dim, "num_timesteps": model.num_timesteps}
        extra: dict[str, Any] = {"architecture": arch, "parameters": sum(p.numel() for p in model.parameters())}
        extra["schedule"] = {"kind": "linear betas 1e-4..0.02", "num_timesteps": 1000, "prediction": "eps"}
        if not args.no_eval:
            extra["held_out"] = {"settings": EVAL_SETTINGS, **measure_denoiser(model, classifier)}
            print(f"{name}: {extra['held_out']}")
        write_checkpoint(model, name, _record("DigitsUNet", recipe, data, command, seconds, **extra), args.out)
        print(f"{name}: trained in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(guarded("python -m guidekit.zoo.train", main))
