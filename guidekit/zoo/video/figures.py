"""The figures recorded beside the video checkpoints, each on held-out test clips fixed by a seed.

The ``check`` entries are small enough for the test suite to recompute from the shipped weights
(``tests/test_video_zoo.py``); the others are the full measurements.
"""

from __future__ import annotations

from typing import Any

import torch

from ...strategies.cfg import CFG
from .classifier import FrameClassifier
from .data import make_clips
from .model import VideoDenoiser
from .run import EvalSetting, balanced_labels, evaluate, real_reference

__all__ = ["DENOISE_SIGMAS", "classifier_accuracy", "classifier_figures", "denoise_mse", "denoiser_figures"]

DENOISE_SIGMAS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)
"""EDM noise levels at which the denoising error is recorded."""


def classifier_accuracy(classifier: FrameClassifier, clips: int, seed: int) -> float:
    """Per-frame accuracy on ``clips`` class-balanced test clips drawn with ``seed``."""
    per_class = max(1, clips // 10)
    real = make_clips(10 * per_class, seed=seed, split="test", labels=balanced_labels(per_class))
    b, _, f, h, w = real.video.shape
    with torch.no_grad():
        logits = classifier(real.video.transpose(1, 2).reshape(b * f, 1, h, w))
    return float((logits.argmax(1) == real.labels.repeat_interleave(f)).double().mean())


def classifier_figures(classifier: FrameClassifier) -> dict[str, Any]:
    """Held-out per-frame accuracy: 500 test clips, and the 20-clip check subset."""
    return {
        "frame_acc_test": round(classifier_accuracy(classifier, 500, seed=11), 6),
        "check": {"clips": 20, "seed": 11, "frame_acc": round(classifier_accuracy(classifier, 20, seed=11), 6)},
    }


def denoise_mse(model: VideoDenoiser, clips: int, seed: int, sigmas: tuple[float, ...] = DENOISE_SIGMAS) -> dict:
    """MSE of ``D(x0 + sigma n; sigma, label)`` against ``x0`` on test clips, per sigma (conditional and null label)."""
    real = make_clips(clips, seed=seed, split="test")
    gen = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(real.video.shape, generator=gen)
    null = torch.full_like(real.labels, model.null_label)
    out: dict[str, dict[str, float]] = {"cond": {}, "uncond": {}}
    with torch.no_grad():
        for sigma in sigmas:
            x = real.video + sigma * noise
            for key, labels in (("cond", real.labels), ("uncond", null)):
                err = (model(x, sigma, labels) - real.video).square().mean()
                out[key][str(sigma)] = round(float(err), 6)
    return out


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in metrics.items()}


def denoiser_figures(model: VideoDenoiser, classifier: FrameClassifier) -> dict[str, Any]:
    """Denoising error per sigma, and sample metrics (conditional only and CFG 3) against 200 real clips."""
    reference, _ = real_reference(classifier)
    full = EvalSetting(per_class=10, steps=16, sampler="heun")
    check = EvalSetting(per_class=2, steps=8, sampler="heun")
    samples = {
        name: _rounded(evaluate(model, classifier, reference, strategy, full)[0])
        for name, strategy in (("cond", None), ("cfg3", CFG(3.0)))
    }
    return {
        "denoise_mse": denoise_mse(model, 64, seed=12),
        "reference": {"clips": reference.clips, "seed": 7, "mc_diff": reference.mc_diff, "flicker": reference.flicker},
        "samples": {"setting": {"per_class": 10, "steps": full.steps, "sampler": full.sampler}, **samples},
        "check": {
            "denoise_mse": denoise_mse(model, 8, seed=12, sigmas=(0.2, 2.0)),
            "setting": {"per_class": check.per_class, "steps": check.steps, "sampler": check.sampler},
            "cond": _rounded(evaluate(model, classifier, reference, None, check)[0]),
        },
    }
