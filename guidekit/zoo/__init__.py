"""The embedded real model: a class-conditional denoiser and an evaluation classifier for 8x8 digits.

Both are trained on scikit-learn's digits (train split only) by ``python -m guidekit.zoo.train`` and ship
inside the package as safetensors files with a JSON record (``guidekit/zoo/checkpoints/``); loading them
is the default and reads no network.

>>> from guidekit import zoo
>>> zoo.load_denoiser().prediction
'eps'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .classifier import FEATURE_DIM, DigitsClassifier
from .data import DIGITS_SPLIT, DigitsSplit, load_digits
from .store import CHECKPOINT_DIR, read_record, read_weights
from .unet import NULL_CLASS, NUM_CLASSES, DigitsUNet, linear_beta_alphas_cumprod

__all__ = [
    "CHECKPOINT_DIR",
    "DIGITS_SPLIT",
    "FEATURE_DIM",
    "NULL_CLASS",
    "NUM_CLASSES",
    "DigitsClassifier",
    "DigitsSplit",
    "DigitsUNet",
    "checkpoint_record",
    "linear_beta_alphas_cumprod",
    "load_classifier",
    "load_denoiser",
    "load_digits",
    "load_weak_denoiser",
]

DENOISER = "digits_denoiser"
WEAK_DENOISER = "digits_denoiser_weak"
CLASSIFIER = "digits_classifier"


def checkpoint_record(name: str = DENOISER, directory: Path | str | None = None) -> dict[str, Any]:
    """The JSON record of a shipped checkpoint: training command, seed, split, steps, measured figures."""
    return read_record(name, directory)


def _load_unet(name: str, directory: Path | str | None) -> DigitsUNet:
    arch = read_record(name, directory)["architecture"]
    model = DigitsUNet(tuple(arch["channels"]), arch["emb_dim"], arch["num_timesteps"])
    return read_weights(model, name, directory)  # type: ignore[return-value]


def load_denoiser(directory: Path | str | None = None) -> DigitsUNet:
    """The shipped class-conditional eps-prediction denoiser (EMA weights), in eval mode.

    Call it as ``model(x, t, labels)`` with labels ``0..9`` or ``NULL_CLASS`` (10) for the unconditional
    prediction; ``model.alphas_cumprod`` is its 1000-step linear-beta VP schedule.
    """
    return _load_unet(DENOISER, directory)


def load_weak_denoiser(directory: Path | str | None = None) -> DigitsUNet:
    """A deliberately weak denoiser of the same data (fewer channels, shorter training) for AutoGuidance."""
    return _load_unet(WEAK_DENOISER, directory)


def load_classifier(directory: Path | str | None = None) -> DigitsClassifier:
    """The shipped evaluation classifier (64-d penultimate features), in eval mode."""
    return read_weights(DigitsClassifier(), CLASSIFIER, directory)  # type: ignore[return-value]
