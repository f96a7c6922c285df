"""Texture-aware metrics of glyph samples: per-attribute accuracy, FD, high-pass spectral error, saturation.

* ``acc`` (both heads right), ``digit_acc``, ``texture_acc``; ``p_y`` = mean of ``p(digit | x) p(texture | x)``
  of the requested values (the smooth joint prompt fidelity), ``p_digit``, ``p_texture``.
* ``fd``: Fréchet distance of the classifier's 64-d features to real held-out glyphs.
* ``spec_err``: texture fidelity. Per requested texture, the mean power spectrum of the samples on the
  high-pass band (frequencies with ``max(|kx|, |ky|) >= 3`` cycles per image, where the period-4 textures
  live) against that of real glyphs of the same texture; the mean absolute log10 ratio over the band's bins,
  averaged over textures. 0 is a perfect match; 0.3 is a factor 2 in power.
* ``sat``: share of pixels with ``|x| > 1`` before the clamp; ``over_share``: share with ``|x| > 1.1``.
* ``neg_rate`` (:func:`excluded_rate`): share of samples whose texture head names an excluded texture.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from ...errors import ShapeError
from ...metrics import feature_stats, frechet_distance_from_stats
from .classifier import GlyphsClassifier
from .data import NUM_DIGITS, TEXTURES, make_glyphs

__all__ = ["HIGH_PASS", "GlyphsReference", "excluded_rate", "glyph_metrics", "glyphs_reference", "high_pass_spectrum"]

HIGH_PASS = 3
"""Lowest frequency (cycles per image, max-norm) of the high-pass band of ``spec_err``."""


def high_pass_spectrum(images: Tensor) -> Tensor:
    """Mean power spectrum ``(n_band,)`` of ``(n, 1, h, w)`` images on the high-pass band (float64)."""
    x = images.to(torch.float64)[:, 0]
    power = torch.fft.fft2(x - x.mean(dim=(1, 2), keepdim=True)).abs().square().mean(0)
    h, w = power.shape
    ky = torch.fft.fftfreq(h, 1.0 / h).abs().view(h, 1)
    kx = torch.fft.fftfreq(w, 1.0 / w).abs().view(1, w)
    return power[torch.maximum(ky, kx) >= HIGH_PASS] / (h * w)


@dataclass(frozen=True)
class GlyphsReference:
    """Real held-out glyphs embedded once: classifier features and per-texture high-pass spectra."""

    features: Tensor
    spectra: Tensor
    """``(len(TEXTURES), n_band)``."""
    images: int

    @cached_property
    def stats(self) -> tuple[Tensor, Tensor]:
        return feature_stats(self.features)


def glyphs_reference(classifier: GlyphsClassifier, per_prompt: int = 20, seed: int = 7) -> GlyphsReference:
    """``per_prompt`` real test glyphs of each of the 50 (digit, texture) prompts (default 1000 images)."""
    combos = torch.arange(NUM_DIGITS * len(TEXTURES)).repeat(per_prompt)
    real = make_glyphs(len(combos), seed=seed, split="test", digits=combos % NUM_DIGITS, textures=combos // NUM_DIGITS)
    with torch.no_grad():
        features = torch.cat([classifier.features(chunk) for chunk in real.images.split(1000)])
    spectra = torch.stack([high_pass_spectrum(real.images[real.textures == t]) for t in range(len(TEXTURES))])
    return GlyphsReference(features, spectra, len(combos))


def _probabilities(classifier: GlyphsClassifier, samples: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        parts = [classifier.heads(chunk) for chunk in samples.clamp(-1.0, 1.0).split(1000)]
    features = torch.cat([p[0] for p in parts])
    digit = torch.softmax(torch.cat([p[1] for p in parts]).double(), 1)
    texture = torch.softmax(torch.cat([p[2] for p in parts]).double(), 1)
    return features, digit, texture


def glyph_metrics(
    samples: Tensor, digits: Tensor, textures: Tensor, classifier: GlyphsClassifier, reference: GlyphsReference
) -> dict[str, float]:
    """The metrics of raw ``samples`` (before any clamp) generated for ``digits`` and ``textures`` ``(n,)``.

    The classifier sees the samples clamped to ``[-1, 1]``, like a saved image; ``spec_err`` and the
    saturation shares see them raw.
    """
    n = samples.shape[0]
    for name, values in (("digits", digits), ("textures", textures)):
        if values.shape != (n,):
            raise ShapeError(f"{name}: expected ({n},), one per sample, got {tuple(values.shape)}")
    features, p_digit, p_texture = _probabilities(classifier, samples)
    digit_ok = p_digit.argmax(1) == digits
    texture_ok = p_texture.argmax(1) == textures
    pd = p_digit.gather(1, digits[:, None])[:, 0]
    pt = p_texture.gather(1, textures[:, None])[:, 0]
    errors = []
    for t in textures.unique().tolist():
        mine = samples[textures == t]
        if len(mine):
            ratio = (high_pass_spectrum(mine) + 1e-8) / (reference.spectra[t] + 1e-8)
            errors.append(float(ratio.log10().abs().mean()))
    return {
        "acc": float((digit_ok & texture_ok).double().mean()),
        "p_y": float((pd * pt).mean()),
        "digit_acc": float(digit_ok.double().mean()),
        "texture_acc": float(texture_ok.double().mean()),
        "p_digit": float(pd.mean()),
        "p_texture": float(pt.mean()),
        "fd": frechet_distance_from_stats(*feature_stats(features), *reference.stats),
        "spec_err": sum(errors) / len(errors) if errors else float("nan"),
        "sat": float((samples.abs() > 1.0).double().mean()),
        "over_share": float((samples.abs() > 1.1).double().mean()),
    }


def excluded_rate(classifier: GlyphsClassifier, samples: Tensor, excluded: int | Tensor) -> float:
    """Share of samples whose texture head's arg-max is ``excluded`` (one texture index, or ``(n,)``)."""
    _, _, p_texture = _probabilities(classifier, samples)
    excluded = torch.as_tensor(excluded, dtype=torch.int64).expand(samples.shape[0])
    return float((p_texture.argmax(1) == excluded).double().mean())
