"""The embedded video model: moving digits in 5-D, with a per-frame evaluation classifier.

Clips are 8 frames of 16x16 (``(b, 1, 8, 16, 16)``, layout ``b c f h w``) in which one scikit-learn digit
moves on a straight path while its scale and brightness drift (:func:`make_clips`). The denoiser is a
class-conditional EDM model (``prediction="edm"``: it returns ``x0``) trained by
``python -m guidekit.zoo.video.train``; both networks ship as safetensors with JSON records in
``guidekit/zoo/checkpoints/`` (``video_denoiser``, ``video_classifier``).

>>> from guidekit.zoo import video
>>> video.load_denoiser().config.frames
8
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..store import read_record, read_weights, require_checkpoint
from .classifier import FrameClassifier
from .data import Clips, MotionConfig, digit_sprites, make_clips, render_clips
from .model import VideoDenoiser, VideoDenoiserConfig
from .run import EvalSetting, balanced_labels, evaluate, initial_noise, real_reference, sample_clips

__all__ = [
    "CLASSIFIER",
    "DENOISER",
    "Clips",
    "EvalSetting",
    "FrameClassifier",
    "MotionConfig",
    "VideoDenoiser",
    "VideoDenoiserConfig",
    "balanced_labels",
    "checkpoint_record",
    "digit_sprites",
    "evaluate",
    "initial_noise",
    "load_classifier",
    "load_denoiser",
    "make_clips",
    "real_reference",
    "render_clips",
    "sample_clips",
]

DENOISER = "video_denoiser"
CLASSIFIER = "video_classifier"


def checkpoint_record(name: str = DENOISER, directory: Path | str | None = None) -> dict[str, Any]:
    """The JSON record of a shipped video checkpoint: command, recipe, architecture, measured figures."""
    require_checkpoint(name, directory)
    return read_record(name, directory)


def load_denoiser(directory: Path | str | None = None, layout: str = "b c f h w") -> VideoDenoiser:
    """The shipped video denoiser (EMA weights, eval mode), taking and returning clips in ``layout``.

    Call it as ``model(x, sigma, labels)`` with EDM ``x = x0 + sigma * noise`` and labels ``0..9`` or
    ``model.null_label`` (10); sample with ``guidekit.sample(model, x_T, prediction="edm", layout=layout)``.
    """
    config = VideoDenoiserConfig.from_dict(checkpoint_record(DENOISER, directory)["architecture"])
    model = read_weights(VideoDenoiser(config), DENOISER, directory)
    return model.with_layout(layout) if layout != model.layout else model  # type: ignore[return-value]


def load_classifier(directory: Path | str | None = None) -> FrameClassifier:
    """The shipped per-frame evaluation classifier (16x16 frames, 64-d features), in eval mode."""
    require_checkpoint(CLASSIFIER, directory)
    return read_weights(FrameClassifier(), CLASSIFIER, directory)  # type: ignore[return-value]
