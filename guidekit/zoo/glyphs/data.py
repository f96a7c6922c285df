"""Procedural glyphs: 16x16 digits on a prompt-dependent texture, built from scikit-learn's 8x8 digits.

An image is a white digit (``+1``) over a textured background. The digit is a source digit of the image
zoo's split, upsampled to 16x16 (bilinear) with a random shift of up to ``max_shift`` pixels and a random
stroke brightness; the background is one of :data:`TEXTURES`, a binary pattern of period 4 (2 px) with a
random phase, between ``-1`` and ``-1 + contrast``. Both ends of the range are reached (strokes at ``+1``,
the texture's dark cells at ``-1``), so a guidance scale that overshoots saturates the texture and the digit
alike. Everything is drawn from one ``seed``: the same seed gives bit-identical images.

A *prompt* is two tokens, ``(digit, texture)``; each slot has its own null value (:data:`NULL_DIGIT`,
:data:`NULL_TEXTURE`) which condition dropout uses independently per slot, so a prompt may leave a slot
unspecified and a negative prompt may name only one (``texture=dots``). :func:`encode_prompt` turns text
such as ``"digit=3 texture=stripes45"`` into the token tensor the denoiser takes.

>>> from guidekit.zoo.glyphs.data import encode_prompt, make_glyphs
>>> encode_prompt("digit=3, texture=checks").tolist()
[[3, 3]]
>>> make_glyphs(4, seed=0).images.shape
torch.Size([4, 1, 16, 16])
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError

__all__ = [
    "NULL_DIGIT",
    "NULL_TEXTURE",
    "NUM_DIGITS",
    "SIZE",
    "TEXTURES",
    "GlyphStyle",
    "Glyphs",
    "encode_prompt",
    "make_glyphs",
    "prompt_tokens",
    "source_digits",
    "texture_patterns",
]

SIZE = 16
"""Side of a glyph image in pixels."""

NUM_DIGITS = 10
TEXTURES = ("stripes0", "stripes90", "stripes45", "checks", "dots")
"""The texture attribute's values: horizontal, vertical and diagonal stripes, a checkerboard, a dot lattice."""

NULL_DIGIT = NUM_DIGITS
"""The digit slot's null token (condition dropout; "any digit")."""

NULL_TEXTURE = len(TEXTURES)
"""The texture slot's null token (condition dropout; "any texture")."""

PERIOD = 4
"""Period of every texture in pixels (cells of 2 px): the finest pattern a 16x16 image shows cleanly."""


@dataclass(frozen=True)
class GlyphStyle:
    """Ranges the random rendering is drawn from (uniformly).

    Attributes:
        max_shift: largest shift of the digit, in pixels, along each axis.
        brightness: range of the stroke's peak value mapped to ``[-1, 1]`` (1 = full white ``+1``).
        contrast: range of the texture's bright cells above ``-1`` (the dark cells stay at ``-1``).
    """

    max_shift: int = 1
    brightness: tuple[float, float] = (0.85, 1.0)
    contrast: tuple[float, float] = (0.4, 0.7)

    def __post_init__(self) -> None:
        if not (isinstance(self.max_shift, int) and 0 <= self.max_shift <= 3):
            raise ConfigError(f"max_shift: expected an int in [0, 3], got {self.max_shift!r}")
        for name in ("brightness", "contrast"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ConfigError(f"{name}: expected (lo, hi) with 0 < lo <= hi <= 1, got {(lo, hi)!r}")


@dataclass(frozen=True)
class Glyphs:
    """Images ``(n, 1, 16, 16)`` in ``[-1, 1]`` (float32), their digits and textures ``(n,)`` (int64)."""

    images: Tensor
    digits: Tensor
    textures: Tensor

    @property
    def tokens(self) -> Tensor:
        """The prompts ``(n, 2)`` that describe the images fully: ``[digit, texture]``."""
        return prompt_tokens(self.digits, self.textures)


@cache
def source_digits(split: str) -> tuple[Tensor, Tensor]:
    """The split's 8x8 source digits upsampled to 16x16 as stroke masks in ``[0, 1]``, and their labels."""
    from ..data import load_digits

    images, labels = load_digits().split(split)
    masks = F.interpolate((images + 1.0) / 2.0, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return masks.clamp(0.0, 1.0), labels


def texture_patterns(textures: Tensor, phase_x: Tensor, phase_y: Tensor, size: int = SIZE) -> Tensor:
    """Binary patterns ``(n, 1, size, size)`` (1 = bright cell) of ``textures`` with integer phases."""
    yy = torch.arange(size).view(1, size, 1) + phase_y.view(-1, 1, 1)
    xx = torch.arange(size).view(1, 1, size) + phase_x.view(-1, 1, 1)
    half = PERIOD // 2
    options = torch.stack(
        [
            (yy % PERIOD < half).expand(-1, size, size),  # stripes0: horizontal
            (xx % PERIOD < half).expand(-1, size, size),  # stripes90: vertical
            ((xx + yy) % PERIOD < half),  # stripes45: diagonal
            ((xx // half + yy // half) % 2 == 0),  # checks
            ((xx % PERIOD < half) & (yy % PERIOD < half)),  # dots: a 2x2 dot in every 4x4 cell
        ],
        dim=1,
    )  # (n, T, size, size)
    return options.gather(1, textures.view(-1, 1, 1, 1).expand(-1, 1, size, size)).float()


def _labels(name: str, given: Tensor | None, n: int, high: int, gen: torch.Generator) -> Tensor:
    if given is None:
        return torch.randint(high, (n,), generator=gen)
    given = torch.as_tensor(given, dtype=torch.int64).reshape(-1)
    if given.shape[0] != n or (n and (int(given.min()) < 0 or int(given.max()) >= high)):
        raise ConfigError(
            f"{name}: expected {n} values in [0, {high - 1}], got {given.tolist()[:8]} (len {len(given)})"
        )
    return given


def make_glyphs(
    n: int,
    seed: int,
    split: str = "train",
    digits: Tensor | None = None,
    textures: Tensor | None = None,
    style: GlyphStyle | None = None,
) -> Glyphs:
    """``n`` glyph images drawn from ``seed`` (same seed, same images) from the ``split``'s source digits.

    ``digits`` / ``textures`` fix the attributes (``(n,)`` ints); by default both are uniform. Each image's
    source digit is drawn among the split's digits of its class.
    """
    if not (isinstance(n, int) and n >= 1):
        raise ConfigError(f"n: expected a positive int, got {n!r}")
    if split not in ("train", "test"):
        raise ConfigError(f"split: expected 'train' or 'test', got {split!r}")
    style = GlyphStyle() if style is None else style
    gen = torch.Generator().manual_seed(int(seed))
    digits = _labels("digits", digits, n, NUM_DIGITS, gen)
    textures = _labels("textures", textures, n, len(TEXTURES), gen)
    masks, labels = source_digits(split)
    # one source digit of the right class per image: a uniform pick among that class's rows
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=NUM_DIGITS)
    starts = torch.cumsum(counts, 0) - counts
    pick = (torch.rand(n, generator=gen) * counts[digits]).long().clamp_max(counts[digits] - 1)
    mask = masks[order[starts[digits] + pick]]
    shift = torch.randint(-style.max_shift, style.max_shift + 1, (n, 2), generator=gen)
    mask = torch.stack([m.roll((int(s[0]), int(s[1])), dims=(1, 2)) for m, s in zip(mask, shift, strict=True)])
    brightness = _uniform(style.brightness, n, gen).view(n, 1, 1, 1)
    contrast = _uniform(style.contrast, n, gen).view(n, 1, 1, 1)
    phase = torch.randint(PERIOD, (n, 2), generator=gen)
    background = -1.0 + contrast * texture_patterns(textures, phase[:, 0], phase[:, 1])
    stroke = -1.0 + 2.0 * brightness
    images = background * (1.0 - mask) + stroke * mask
    return Glyphs(images.float(), digits, textures)


def _uniform(bounds: tuple[float, float], n: int, gen: torch.Generator) -> Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def prompt_tokens(digits: Tensor | int | None, textures: Tensor | int | None, n: int | None = None) -> Tensor:
    """Prompts ``(n, 2)`` ``[digit, texture]``; ``None`` in a slot is its null token.

    ``n`` broadcasts scalar slots; without it the length comes from a tensor slot (else 1).
    """
    sizes = [len(torch.as_tensor(v).reshape(-1)) for v in (digits, textures) if v is not None]
    length = n if n is not None else max(sizes, default=1)
    d = torch.full((length,), NULL_DIGIT) if digits is None else torch.as_tensor(digits, dtype=torch.int64)
    t = torch.full((length,), NULL_TEXTURE) if textures is None else torch.as_tensor(textures, dtype=torch.int64)
    d, t = d.reshape(-1).expand(length), t.reshape(-1).expand(length)
    if int(d.min()) < 0 or int(d.max()) > NULL_DIGIT:
        raise ConfigError(f"digits: expected values in [0, {NULL_DIGIT}] ({NULL_DIGIT} = null), got {d.tolist()[:8]}")
    if int(t.min()) < 0 or int(t.max()) > NULL_TEXTURE:
        raise ConfigError(
            f"textures: expected values in [0, {NULL_TEXTURE}] ({NULL_TEXTURE} = null), got {t.tolist()[:8]}"
        )
    return torch.stack([d, t], dim=1).contiguous()


_PROMPT_ITEM = re.compile(r"^\s*(digit|texture)\s*=\s*([A-Za-z0-9_]+)\s*$")


def encode_prompt(text: str, n: int = 1) -> Tensor:
    """Prompt text -> tokens ``(n, 2)``: ``"digit=3, texture=stripes45"``, ``"texture=dots"``, ``""`` (null).

    Items are ``digit=<0-9>`` and ``texture=<one of TEXTURES>``, separated by commas or spaces, each at most
    once; a slot not named is null. Brackets around the whole prompt are allowed (``[digit=3]``).
    """
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    digit: int | None = None
    texture: int | None = None
    for item in (s for s in re.split(r"[,\s]+(?=[a-z]+\s*=)|,", body) if s.strip()):
        match = _PROMPT_ITEM.match(item)
        if match is None:
            raise ConfigError(f"prompt: expected items 'digit=<0-9>' or 'texture=<{'|'.join(TEXTURES)}>', got {item!r}")
        key, value = match.groups()
        if (digit if key == "digit" else texture) is not None:
            raise ConfigError(f"prompt: expected {key!r} at most once, got it twice in {text!r}")
        if key == "digit":
            if not (value.isdigit() and 0 <= int(value) < NUM_DIGITS):
                raise ConfigError(f"prompt: expected digit in 0..9, got {value!r} in {text!r}")
            digit = int(value)
        else:
            if value not in TEXTURES:
                raise ConfigError(f"prompt: expected texture in {list(TEXTURES)}, got {value!r} in {text!r}")
            texture = TEXTURES.index(value)
    return prompt_tokens(digit, texture, n)
