"""The glyphs model as a :class:`~guidekit.zoo.compare.Bench`: ``guidekit demo/compare --model glyphs``.

A "class" of the bench is one of the 50 full prompts ``[digit, texture]``, numbered texture-major
(``label = 10 * texture + digit``), so the grid's first ten columns are the digits 0-9 in ``stripes0``.
The unconditional branch is the all-null prompt, or, with ``negative``, the negative prompt
``[null, negative]``: CFG with a negative prompt is plain CFG whose ``uncond`` condition is the negative
prompt's tokens (``u + w (c - u)`` moves away from it). With ``free_texture`` (the default when a negative
is given) the conditional prompt names the digit only (``[digit, null]``), so the texture is the model's
choice, and ``neg_rate`` reports how often it picks the ``watch``ed texture (default: the negative one);
``GlyphsBench(free_texture=True, watch="dots")`` is the same run without the negative prompt. With
``unprompted`` every prompt token is null in both branches (unconditional sampling: what PAG, SEG and SAG
guide without a prompt); the "classes" are then only the sample count, the digit and texture the classifier
sees are scored as given, and the metrics that mean something are ``fd``, ``spec_err`` and ``sat``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...errors import ConfigError
from ...strategies.base import GuidanceStrategy
from ..compare import Bench
from .data import NULL_DIGIT, NULL_TEXTURE, NUM_DIGITS, SIZE, TEXTURES, make_glyphs, prompt_tokens
from .metrics import excluded_rate, glyph_metrics, glyphs_reference

__all__ = ["GlyphsBench", "label_prompts"]


def label_prompts(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Bench labels -> ``(digits, textures)``: ``label = 10 * texture + digit``."""
    return labels % NUM_DIGITS, labels // NUM_DIGITS


class GlyphsBench(Bench):
    """The shipped glyphs denoiser, measured with the two-head classifier against real held-out glyphs.

    Metrics (:mod:`.metrics`): ``acc``, ``p_y``, ``digit_acc``, ``texture_acc``, ``fd``, ``spec_err``,
    ``sat``, ``over_share`` (and ``neg_rate`` with a ``negative`` texture); plus ``nfe`` and ``seconds``.

    Args:
        negative: a texture name (one of :data:`~.data.TEXTURES`) to exclude with a negative prompt, or
            ``None`` (default) for the all-null unconditional branch.
        free_texture: prompts name the digit only (a "class" is a digit); default: whether ``negative``
            is given.
        watch: the texture whose rate ``neg_rate`` reports (default ``negative``); needs ``free_texture``.
        unprompted: every prompt token null (unconditional sampling); implies ``free_texture``.
        model, classifier: default to the shipped checkpoints (in ``directory``, default the package's).
    """

    name = "glyphs"
    quality = "fd"
    fidelity = "p_y"
    reference_name = "held-out glyphs"
    event_shape = (1, SIZE, SIZE)

    def __init__(
        self,
        negative: str | None = None,
        free_texture: bool | None = None,
        watch: str | None = None,
        model: torch.nn.Module | None = None,
        classifier: torch.nn.Module | None = None,
        directory: str | None = None,
        reference_per_prompt: int = 20,
        unprompted: bool = False,
    ) -> None:
        from . import load_classifier, load_denoiser

        for name, value in (("negative", negative), ("watch", watch)):
            if value is not None and value not in TEXTURES:
                raise ConfigError(f"{name}: expected a texture among {list(TEXTURES)} or None, got {value!r}")
        if unprompted and (negative is not None or watch is not None):
            raise ConfigError(f"unprompted: expected no negative or watch with it, got {negative!r}, {watch!r}")
        self.unprompted = bool(unprompted)
        self.negative = None if negative is None else TEXTURES.index(negative)
        self.free_texture = self.unprompted or (negative is not None if free_texture is None else bool(free_texture))
        watch = negative if watch is None else watch
        if watch is not None and not self.free_texture:
            raise ConfigError(f"watch: expected it only with free_texture=True (digit-only prompts), got {watch!r}")
        self.watch = None if watch is None else TEXTURES.index(watch)
        self.model = load_denoiser(directory) if model is None else model
        self.classifier = load_classifier(directory) if classifier is None else classifier
        self.reference = glyphs_reference(self.classifier, per_prompt=reference_per_prompt)
        base = ("acc", "p_y", "digit_acc", "texture_acc", "fd", "spec_err", "sat", "over_share")
        if not self.free_texture:
            self.num_classes = NUM_DIGITS * len(TEXTURES)
            self.columns = base
        elif self.unprompted:
            self.name = "glyphs, no prompt"
            self.reference_name = "held-out glyphs (any digit, any texture)"
            self.num_classes = NUM_DIGITS
            self.columns = ("fd", "spec_err", "sat")
        else:
            self.name = "glyphs, digit-only prompts" + (f", negative texture={negative}" if negative else "")
            self.reference_name = "held-out glyphs (any texture)"
            self.num_classes = NUM_DIGITS
            self.fidelity = "p_digit"
            self.columns = ("digit_acc", "p_digit", *(("neg_rate",) if watch else ()), "fd", "spec_err", "sat")

    def _prompts(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.unprompted:
            return torch.full_like(labels, NULL_DIGIT), torch.full_like(labels, NULL_TEXTURE)
        if not self.free_texture:
            return label_prompts(labels)
        return labels, torch.full_like(labels, NULL_TEXTURE)

    def _branches(self, strategy: GuidanceStrategy, labels: Tensor) -> dict[str, Any]:
        if "weak" in strategy.models():
            raise ConfigError(
                f"strategy: {type(strategy).__name__} needs a weak model, which the glyphs bench does not have"
            )
        digits, textures = self._prompts(labels)
        cond = prompt_tokens(digits, textures)
        if self.negative is None:
            uncond = prompt_tokens(None, None, len(labels))
        else:
            uncond = prompt_tokens(torch.full_like(labels, NULL_DIGIT), torch.full_like(labels, self.negative))
        return {"prediction": "eps", "alphas_cumprod": self.model.alphas_cumprod, "cond": cond, "uncond": uncond}

    def measure(self, samples: Tensor, labels: Tensor, seed: int) -> dict[str, float]:
        digits, textures = self._prompts(labels)
        if not self.free_texture:
            return glyph_metrics(samples, digits, textures, self.classifier, self.reference)
        # the texture is free: score the texture the classifier sees (so texture_acc is 1 by definition)
        with torch.no_grad():
            heads = self.classifier.heads(samples.clamp(-1.0, 1.0))
        seen = heads[2].argmax(1)
        if self.unprompted:  # the digit is free too
            digits = heads[1].argmax(1)
        out = glyph_metrics(samples, digits, seen, self.classifier, self.reference)
        if self.watch is not None:
            out["neg_rate"] = excluded_rate(self.classifier, samples, self.watch)
        return out

    def reference_images(self, per_class: int) -> Tensor:
        labels = self.labels(per_class)
        digits, textures = self._prompts(labels)
        if self.free_texture:
            textures = None
        if self.unprompted:
            digits = None
        return make_glyphs(len(labels), seed=1000, split="test", digits=digits, textures=textures).images
