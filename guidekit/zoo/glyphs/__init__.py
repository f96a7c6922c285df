"""The embedded glyphs model: a small text-to-image-style denoiser with prompt tokens.

16x16 glyphs (:mod:`.data`: a scikit-learn digit over one of five period-4 textures) generated from a
two-token prompt ``[digit, texture]`` that enters the U-net only through cross-attention; the U-net also
has self-attention at 8x8 and 4x4 (:mod:`.model`, layer names ``down1``/``mid``/``up1`` ``.self_attn`` and
``.cross_attn``). An evaluation classifier with a digit head and a texture head measures the samples
(:mod:`.metrics`). Both are trained by ``python -m guidekit.zoo.glyphs.train`` and ship as safetensors with
JSON records in ``guidekit/zoo/checkpoints/`` (``glyphs_denoiser``, ``glyphs_classifier``).

>>> from guidekit.zoo import glyphs
>>> glyphs.load_denoiser().prediction
'eps'
>>> glyphs.encode_prompt("digit=3, texture=dots").tolist()
[[3, 4]]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..store import read_record, read_weights, require_checkpoint
from .classifier import FEATURE_DIM, GlyphsClassifier
from .data import (
    NULL_DIGIT,
    NULL_TEXTURE,
    NUM_DIGITS,
    SIZE,
    TEXTURES,
    Glyphs,
    GlyphStyle,
    encode_prompt,
    make_glyphs,
    prompt_tokens,
)
from .model import GlyphsUNet, GlyphsUNetConfig

__all__ = [
    "CLASSIFIER",
    "DENOISER",
    "FEATURE_DIM",
    "NULL_DIGIT",
    "NULL_TEXTURE",
    "NUM_DIGITS",
    "SIZE",
    "TEXTURES",
    "GlyphStyle",
    "Glyphs",
    "GlyphsClassifier",
    "GlyphsUNet",
    "GlyphsUNetConfig",
    "checkpoint_record",
    "encode_prompt",
    "load_classifier",
    "load_denoiser",
    "make_glyphs",
    "prompt_tokens",
]

DENOISER = "glyphs_denoiser"
CLASSIFIER = "glyphs_classifier"


def checkpoint_record(name: str = DENOISER, directory: Path | str | None = None) -> dict[str, Any]:
    """The JSON record of a shipped glyphs checkpoint: command, recipe, architecture, held-out figures."""
    require_checkpoint(name, directory)
    return read_record(name, directory)


def load_denoiser(directory: Path | str | None = None) -> GlyphsUNet:
    """The shipped prompt-conditional eps-prediction denoiser (EMA weights), in eval mode.

    Call it as ``model(x, t, tokens)`` with ``tokens`` ``(b, 2)`` prompts (:func:`encode_prompt`);
    ``model.alphas_cumprod`` is its 1000-step linear-beta VP schedule.
    """
    config = GlyphsUNetConfig.from_dict(checkpoint_record(DENOISER, directory)["architecture"])
    return read_weights(GlyphsUNet(config), DENOISER, directory)  # type: ignore[return-value]


def load_classifier(directory: Path | str | None = None) -> GlyphsClassifier:
    """The shipped two-head evaluation classifier (64-d features; digit and texture heads), in eval mode."""
    require_checkpoint(CLASSIFIER, directory)
    return read_weights(GlyphsClassifier(), CLASSIFIER, directory)  # type: ignore[return-value]
