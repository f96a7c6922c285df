"""The held-out figures recorded beside the glyphs checkpoints (measured on glyphs of the test digits)."""

from __future__ import annotations

from typing import Any

import torch

from .classifier import GlyphsClassifier
from .data import make_glyphs
from .model import GlyphsUNet

__all__ = ["EVAL_SETTINGS", "classifier_figures", "denoiser_figures", "held_out_loss"]

EVAL_SETTINGS = {"sampler": "ddim", "schedule": "trailing", "steps": 30, "per_class": 4, "seed": 0}
"""How the recorded sample figures are measured: 200 samples (4 per digit x texture prompt), 30 DDIM steps."""


def classifier_figures(classifier: GlyphsClassifier, n: int = 4000, seed: int = 12_345) -> dict[str, float]:
    """Accuracy of each head on ``n`` held-out glyphs (test source digits, uniform prompts)."""
    test = make_glyphs(n, seed=seed, split="test")
    with torch.no_grad():
        _, digit, texture = classifier.heads(test.images)
    return {
        "n": n,
        "digit_accuracy": round(float((digit.argmax(1) == test.digits).double().mean()), 4),
        "texture_accuracy": round(float((texture.argmax(1) == test.textures).double().mean()), 4),
    }


def held_out_loss(model: GlyphsUNet, n: int = 1000, seed: int = 54_321) -> float:
    """Mean eps-prediction loss on ``n`` held-out glyphs with their full prompts, over a fixed ``t`` grid."""
    test = make_glyphs(n, seed=seed, split="test")
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, model.num_timesteps - 1, n).round().long()
    eps = torch.randn(test.images.shape, generator=gen)
    a = model.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * test.images + (1 - a).sqrt() * eps
    with torch.no_grad():
        chunks = zip(noisy.split(250), t.split(250), test.tokens.split(250), strict=True)
        pred = torch.cat([model(x, tt, tok) for x, tt, tok in chunks])
    return float((pred - eps).square().mean())


def denoiser_figures(
    model: GlyphsUNet, classifier: GlyphsClassifier, scales: tuple[float, ...] = (1.0, 3.0)
) -> dict[str, Any]:
    """Held-out loss and the glyphs bench's metrics with CFG at each scale (:data:`EVAL_SETTINGS`)."""
    from ...strategies import CFG
    from ..compare import Settings
    from .bench import GlyphsBench

    bench = GlyphsBench(model=model, classifier=classifier)
    settings = Settings(**{k: v for k, v in EVAL_SETTINGS.items() if k != "seed"})
    out: dict[str, Any] = {"eps_loss": round(held_out_loss(model), 5), "settings": EVAL_SETTINGS}
    for scale in scales:
        metrics = bench.run(CFG(scale), settings, seed=EVAL_SETTINGS["seed"]).metrics
        out[f"cfg_{scale:g}"] = {k: round(v, 4) for k, v in metrics.items()}
    return out
