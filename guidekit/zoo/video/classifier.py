"""Per-frame evaluation classifier for moving-digit clips: a small CNN on single ``16 x 16`` frames.

Its 64-d penultimate features embed frames for the per-frame Fréchet distance, and its softmax output per
frame gives per-frame accuracy and the across-clip flicker of the class belief (:mod:`guidekit.metrics.video`).
The image zoo's classifier sees 8x8 digits, so moving 16x16 frames need their own.
"""

from __future__ import annotations

from torch import Tensor, nn

from ...errors import ShapeError

__all__ = ["FrameClassifier"]


class FrameClassifier(nn.Module):
    """``(n, 1, size, size)`` frames in ``[-1, 1]`` -> ``(n, 10)`` logits; :meth:`features` -> ``(n, 64)``."""

    feature_dim = 64

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, self.feature_dim),
            nn.SiLU(),
        )
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, frames: Tensor) -> Tensor:
        """Penultimate features ``(n, 64)`` of frames ``(n, 1, h, w)``."""
        if frames.ndim != 4 or frames.shape[1] != 1:
            raise ShapeError(f"frames: expected (n, 1, h, w), got {tuple(frames.shape)}")
        return self.body(frames.float())

    def forward(self, frames: Tensor) -> Tensor:
        return self.head(self.features(frames))

    def features_and_logits(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """``(features (n, 64), logits (n, 10))`` in one pass (the :mod:`guidekit.metrics` protocol)."""
        feats = self.features(frames)
        return feats, self.head(feats)
