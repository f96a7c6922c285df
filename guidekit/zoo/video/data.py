"""Moving digits: a deterministic video data set built from scikit-learn's 8x8 digits.

A clip is ``frames`` frames of ``size x size`` pixels (default 8 x 16 x 16) in ``[-1, 1]`` (background
``-1``). One source digit moves along a straight path at constant speed while its scale and brightness
drift linearly; every frame is rendered by bilinear resampling of the 8x8 sprite, so motion is sub-pixel.
Everything is drawn from one ``seed``: the same seed gives bit-identical clips.

Train and test clips are made from the disjoint source digits of the image zoo's split (stratified 80/20,
seed 0: 1437 and 360 digits), so a test clip never shows a digit the models were trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError

__all__ = ["Clips", "MotionConfig", "digit_sprites", "make_clips", "render_clips"]

SPRITE = 8
"""Side of the source digits (sklearn ``load_digits``)."""


@dataclass(frozen=True)
class MotionConfig:
    """Ranges the random paths are drawn from (uniformly), in canvas pixels.

    Attributes:
        frames: frames per clip.
        size: canvas side in pixels.
        centre: range of the sprite centre at the first and at the last frame (both axes).
        scale: range of the sprite scale at the first and at the last frame (1 = 8 px tall).
        brightness: range of the peak intensity at the first and at the last frame (1 = full white).
    """

    frames: int = 8
    size: int = 16
    centre: tuple[float, float] = (5.5, 10.5)
    scale: tuple[float, float] = (0.95, 1.2)
    brightness: tuple[float, float] = (0.7, 1.0)

    def __post_init__(self) -> None:
        if not (isinstance(self.frames, int) and self.frames >= 2):
            raise ConfigError(f"frames: expected an int >= 2, got {self.frames!r}")
        if not (isinstance(self.size, int) and self.size >= SPRITE):
            raise ConfigError(f"size: expected an int >= {SPRITE}, got {self.size!r}")
        for name in ("centre", "scale", "brightness"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ConfigError(f"{name}: expected (lo, hi) with lo <= hi, got {(lo, hi)!r}")
        if not 0.0 <= self.centre[0] <= self.centre[1] <= self.size:
            raise ConfigError(f"centre: expected a range inside [0, {self.size}], got {self.centre!r}")
        if self.scale[0] <= 0:
            raise ConfigError(f"scale: expected a positive range, got {self.scale!r}")
        if not 0.0 < self.brightness[0] <= self.brightness[1] <= 1.0:
            raise ConfigError(f"brightness: expected a range inside (0, 1], got {self.brightness!r}")


@dataclass(frozen=True)
class Clips:
    """A batch of clips.

    Attributes:
        video: ``(n, 1, frames, size, size)`` float32 in ``[-1, 1]`` (layout ``b c f h w``).
        labels: ``(n,)`` int64 digit class.
        source: ``(n,)`` int64 index of the source digit within its split.
    """

    video: Tensor
    labels: Tensor
    source: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@cache
def _split_sprites(split: str) -> tuple[Tensor, Tensor]:
    from ..data import load_digits

    images, labels = load_digits().split(split)
    return ((images[:, 0] + 1.0) / 2.0).contiguous(), labels


def digit_sprites(split: str) -> tuple[Tensor, Tensor]:
    """The source digits of ``split`` as ``(n, 8, 8)`` intensities in ``[0, 1]`` and their ``(n,)`` labels.

    ``"train"`` (1437 digits) or ``"test"`` (360): the image zoo's split (:data:`guidekit.zoo.DIGITS_SPLIT`),
    disjoint and stratified by class.
    """
    if split not in ("train", "test"):
        raise ConfigError(f"split: expected 'train' or 'test', got {split!r}")
    sprites, labels = _split_sprites(split)
    return sprites.clone(), labels.clone()


def render_clips(sprites: Tensor, centre: Tensor, scale: Tensor, brightness: Tensor, size: int = 16) -> Tensor:
    """Render ``(n, 8, 8)`` sprites in ``[0, 1]`` along per-frame paths, ``(n, 1, f, size, size)`` in ``[-1, 1]``.

    Args:
        sprites: source digits, intensities in ``[0, 1]``.
        centre: ``(n, f, 2)`` sprite centre ``(x, y)`` per frame, in canvas pixels.
        scale: ``(n, f)`` sprite scale per frame.
        brightness: ``(n, f)`` peak intensity per frame, in ``(0, 1]``.
        size: canvas side.
    """
    n, f = scale.shape
    pix = torch.arange(size, dtype=torch.float32) + 0.5  # canvas pixel centres
    # sprite coordinate of every canvas pixel, per frame: u = (p - centre) / scale + 4, in sprite pixels
    u = (pix.view(1, 1, 1, size) - centre[..., 0, None, None]) / scale[..., None, None] + SPRITE / 2
    v = (pix.view(1, 1, size, 1) - centre[..., 1, None, None]) / scale[..., None, None] + SPRITE / 2
    grid = torch.stack(torch.broadcast_tensors(u, v), dim=-1) * (2.0 / SPRITE) - 1.0  # align_corners=False
    src = sprites[:, None].expand(n, f, SPRITE, SPRITE).reshape(n * f, 1, SPRITE, SPRITE)
    frames = F.grid_sample(
        src, grid.reshape(n * f, size, size, 2), mode="bilinear", padding_mode="zeros", align_corners=False
    )
    frames = frames.reshape(n, f, size, size) * brightness[..., None, None]
    return (2.0 * frames - 1.0)[:, None].contiguous()


def _ramp(gen: torch.Generator, n: int, frames: int, lo: float, hi: float, dims: tuple[int, ...] = ()) -> Tensor:
    """Linear per-clip drift from a uniform start to a uniform end value, ``(n, frames, *dims)``."""
    start = lo + (hi - lo) * torch.rand((n, 1, *dims), generator=gen)
    end = lo + (hi - lo) * torch.rand((n, 1, *dims), generator=gen)
    t = torch.linspace(0.0, 1.0, frames).view(1, frames, *([1] * len(dims)))
    return start + (end - start) * t


def make_clips(
    n: int, seed: int, split: str = "train", motion: MotionConfig | None = None, labels: Tensor | None = None
) -> Clips:
    """``n`` moving-digit clips from the source digits of ``split``, fully determined by ``seed``.

    Args:
        n: number of clips.
        seed: the seed of every random choice (digit, path, scale, brightness).
        split: ``"train"`` or ``"test"`` source digits (disjoint sets).
        motion: ranges of the paths; :class:`MotionConfig` defaults if ``None``.
        labels: optional ``(n,)`` classes to draw; the source digit is then drawn within each class.
    """
    motion = motion or MotionConfig()
    if not (isinstance(n, int) and n >= 1):
        raise ConfigError(f"n: expected a positive int, got {n!r}")
    sprites, all_labels = digit_sprites(split)
    gen = torch.Generator().manual_seed(int(seed))
    if labels is None:
        source = torch.randint(len(all_labels), (n,), generator=gen)
    else:
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (n,) or bool(((labels < 0) | (labels > 9)).any()):
            raise ConfigError(f"labels: expected {n} classes in 0..9, got {labels.tolist()!r}")
        pick = torch.rand(n, generator=gen)
        source = torch.empty(n, dtype=torch.int64)
        for k in range(10):
            mask = labels == k
            members = torch.nonzero(all_labels == k).flatten()
            source[mask] = members[(pick[mask] * len(members)).long().clamp_max(len(members) - 1)]
    f = motion.frames
    centre = _ramp(gen, n, f, *motion.centre, dims=(2,))
    scale = _ramp(gen, n, f, *motion.scale)
    brightness = _ramp(gen, n, f, *motion.brightness)
    video = render_clips(sprites[source], centre, scale, brightness, motion.size)
    return Clips(video=video, labels=all_labels[source].clone(), source=source)
