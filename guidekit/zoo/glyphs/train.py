"""Train the glyphs denoiser and its two-head evaluation classifier on the CPU.

    python -m guidekit.zoo.glyphs.train     # about 35 min on one busy core; writes zoo/checkpoints/glyphs_*

Both networks see fresh glyphs every step (:func:`~.data.make_glyphs` with a per-step seed) made from the
*train* source digits only; every figure in the JSON records is measured on glyphs of the held-out
*test* digits. Fixed seeds and a fixed thread count (``--threads``): a rerun with the same threads gives
the same weights.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..cmdline import counts, guarded, require_extras, seeds, writable_folder
from ..optim import ema_update, warmup_cosine
from ..store import CHECKPOINT_DIR, write_checkpoint
from .classifier import GlyphsClassifier
from .data import NULL_DIGIT, NULL_TEXTURE, GlyphStyle, make_glyphs
from .model import GlyphsUNet, GlyphsUNetConfig, parameter_count

__all__ = ["ClassifierRecipe", "DenoiserRecipe", "main", "train_classifier", "train_denoiser"]

DENOISER = "glyphs_denoiser"
CLASSIFIER = "glyphs_classifier"


@dataclass(frozen=True)
class DenoiserRecipe:
    """How the denoiser is trained: eps loss on the linear-beta VP schedule, per-slot prompt dropout,
    AdamW with warm-up and cosine decay, EMA of the weights."""

    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-2
    p_drop_digit: float = 0.25
    p_drop_texture: float = 0.25
    ema_decay: float = 0.999
    seed: int = 0


LR_FLOOR = 0.02
"""Both networks' learning rate decays (cosine, after a linear warm-up) to this share of its peak."""


@dataclass(frozen=True)
class ClassifierRecipe:
    """How the classifier is trained: the sum of both heads' cross-entropies on fresh train glyphs."""

    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0


def _progress(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=None, mininterval=5.0)


def drop_slots(tokens: torch.Tensor, p_digit: float, p_texture: float, gen: torch.Generator) -> torch.Tensor:
    """Condition dropout per slot: each slot becomes its null token independently with its probability."""
    out = tokens.clone()
    n = len(out)
    out[torch.rand(n, generator=gen) < p_digit, 0] = NULL_DIGIT
    out[torch.rand(n, generator=gen) < p_texture, 1] = NULL_TEXTURE
    return out


def train_denoiser(
    recipe: DenoiserRecipe = DenoiserRecipe(),
    config: GlyphsUNetConfig | None = None,
    style: GlyphStyle | None = None,
    log_every: int = 100,
) -> tuple[GlyphsUNet, list[tuple[int, float]]]:
    """Train a :class:`GlyphsUNet`; return its EMA weights and the loss curve ``[(step, mean loss), ...]``.

    DDPM loss ``|eps - eps_theta(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, prompt)|^2`` with ``t`` uniform
    (Ho et al. 2020, Alg. 1) and per-slot prompt dropout (Ho & Salimans 2022, Alg. 1, one slot at a time).
    """
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    model = GlyphsUNet(config)
    ema = copy.deepcopy(model).requires_grad_(False)
    alphas_cumprod = model.alphas_cumprod.to(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.99))
    curve: list[tuple[int, float]] = []
    running = 0.0
    bar = _progress(recipe.steps, "glyphs denoiser")
    model.train()
    for k in range(recipe.steps):
        batch = make_glyphs(recipe.batch_size, seed=1_000_000 * (recipe.seed + 1) + k, split="train", style=style)
        tokens = drop_slots(batch.tokens, recipe.p_drop_digit, recipe.p_drop_texture, gen)
        t = torch.randint(0, model.num_timesteps, (recipe.batch_size,), generator=gen)
        eps = torch.randn(batch.images.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(k, recipe.steps, recipe.lr, min(200, recipe.steps // 10 + 1), LR_FLOOR)
        loss = F.mse_loss(model(a.sqrt() * batch.images + (1 - a).sqrt() * eps, t, tokens), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, k, recipe.ema_decay)
        running += loss.item()
        if (k + 1) % log_every == 0 or k + 1 == recipe.steps:
            seen = (k % log_every) + 1
            curve.append((k + 1, round(running / seen, 5)))
            bar.set_postfix(loss=f"{running / seen:.4f}")
            print(f"step {k + 1}: loss {running / seen:.4f}", file=sys.stderr, flush=True)
            running = 0.0
        bar.update(1)
    bar.close()
    return ema.eval(), curve


def train_classifier(
    recipe: ClassifierRecipe = ClassifierRecipe(), style: GlyphStyle | None = None
) -> GlyphsClassifier:
    """Train :class:`GlyphsClassifier` on fresh train glyphs (both heads, summed cross-entropy)."""
    torch.manual_seed(recipe.seed)
    model = GlyphsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    bar = _progress(recipe.steps, "glyphs classifier")
    for k in range(recipe.steps):
        batch = make_glyphs(recipe.batch_size, seed=2_000_000 * (recipe.seed + 1) + k, split="train", style=style)
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(k, recipe.steps, recipe.lr, 50, LR_FLOOR)
        _, digit_logits, texture_logits = model.heads(batch.images)
        loss = F.cross_entropy(digit_logits, batch.digits) + F.cross_entropy(texture_logits, batch.textures)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
    bar.close()
    return model.eval().requires_grad_(False)


def main(argv: Sequence[str] | None = None) -> int:
    """Train both networks, measure them on held-out glyphs, write ``glyphs_denoiser`` and ``glyphs_classifier``."""
    from .figures import classifier_figures, denoiser_figures

    parser = argparse.ArgumentParser(prog="python -m guidekit.zoo.glyphs.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="checkpoint directory (default: the package's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of both networks")
    parser.add_argument("--steps", type=int, default=DenoiserRecipe.steps, help="denoiser training steps")
    parser.add_argument("--classifier-steps", type=int, default=ClassifierRecipe.steps)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: fastest on a busy CPU; the weights depend on it)"
    )
    parser.add_argument("--only", choices=("classifier", "denoiser"), help="train only one network")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out sampling figures")
    args = parser.parse_args(argv)
    counts(args, "steps", "classifier_steps", "threads")  # before any work, not after minutes of it
    seeds("--seed", [args.seed])
    require_extras("train", ["sklearn"])
    writable_folder("--out", CHECKPOINT_DIR if args.out is None else args.out)
    torch.set_num_threads(args.threads)
    command = " ".join(["python -m guidekit.zoo.glyphs.train", *(sys.argv[1:] if argv is None else argv)])

    if args.only != "denoiser":
        start = time.perf_counter()
        c_recipe = ClassifierRecipe(steps=args.classifier_steps, seed=args.seed)
        classifier = train_classifier(c_recipe)
        c_record = {
            "model": "GlyphsClassifier",
            "training_command": command,
            "recipe": asdict(c_recipe),
            "style": asdict(GlyphStyle()),
            "train_seconds": round(time.perf_counter() - start, 1),
            "threads": args.threads,
            "torch": torch.__version__,
            "held_out": classifier_figures(classifier),
        }
        write_checkpoint(classifier, CLASSIFIER, c_record, args.out)
        print(f"classifier: {c_record['held_out']}  ({c_record['train_seconds']} s)")
    else:
        from . import load_classifier

        classifier = load_classifier(args.out)

    if args.only != "classifier":
        start = time.perf_counter()
        d_recipe = DenoiserRecipe(steps=args.steps, seed=args.seed)
        config = GlyphsUNetConfig()
        denoiser, curve = train_denoiser(d_recipe, config)
        d_record: dict[str, Any] = {
            "model": "GlyphsUNet",
            "training_command": command,
            "recipe": asdict(d_recipe),
            "architecture": config.to_dict(),
            "schedule": {"kind": "linear betas 1e-4..0.02", "num_timesteps": 1000, "prediction": "eps"},
            "style": asdict(GlyphStyle()),
            "parameters": parameter_count(denoiser),
            "train_seconds": round(time.perf_counter() - start, 1),
            "threads": args.threads,
            "torch": torch.__version__,
            "loss_curve": curve[:: max(1, len(curve) // 20)] + curve[-1:],
        }
        # the weights first (a long training is never lost to a failing measurement), then the figures
        write_checkpoint(denoiser, DENOISER, d_record, args.out)
        if not args.no_eval:
            d_record["held_out"] = denoiser_figures(denoiser, classifier)
            write_checkpoint(denoiser, DENOISER, d_record, args.out)
        print(f"denoiser: {d_record.get('held_out')}  ({d_record['train_seconds']} s)")
    return 0


def refresh_figures(directory: str | Path | None = None) -> int:
    """Re-measure the shipped checkpoints and rewrite only their ``held_out`` figures."""
    import json

    from . import load_classifier, load_denoiser
    from .figures import classifier_figures, denoiser_figures

    base = Path(directory) if directory is not None else CHECKPOINT_DIR
    classifier, denoiser = load_classifier(directory), load_denoiser(directory)
    for name, figures in (
        (CLASSIFIER, classifier_figures(classifier)),
        (DENOISER, denoiser_figures(denoiser, classifier)),
    ):
        path = base / f"{name}.json"
        record = json.loads(path.read_text())
        record["held_out"] = figures
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"{name}: {figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(guarded("python -m guidekit.zoo.glyphs.train", main))
