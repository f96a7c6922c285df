"""The glyphs evaluation classifier: one CNN body, a 64-d feature layer and two heads (digit, texture).

:meth:`GlyphsClassifier.features_and_logits` follows the :mod:`guidekit.metrics` protocol with the
*digit* logits (so the digits tools — accuracy, FD on the features, k-NN — apply unchanged);
:meth:`GlyphsClassifier.heads` returns both heads' logits. The texture head sees the background's
period-4 pattern, so the first convolutions keep full resolution.
"""

from __future__ import annotations

from torch import Tensor, nn

from ...errors import ShapeError
from .data import NUM_DIGITS, SIZE, TEXTURES

__all__ = ["FEATURE_DIM", "GlyphsClassifier"]

FEATURE_DIM = 64


class GlyphsClassifier(nn.Module):
    """``(n, 1, 16, 16)`` glyphs in ``[-1, 1]`` -> digit logits ``(n, 10)`` and texture logits ``(n, 5)``."""

    feature_dim = FEATURE_DIM

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(32, 64, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(64, 64, 3, padding=1),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, FEATURE_DIM),
            nn.SiLU(),
        )
        self.digit_head = nn.Linear(FEATURE_DIM, NUM_DIGITS)
        self.texture_head = nn.Linear(FEATURE_DIM, len(TEXTURES))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``(n, 64)`` shared by both heads."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, SIZE, SIZE):
            raise ShapeError(f"x: expected (n, 1, {SIZE}, {SIZE}) glyphs, got {tuple(x.shape)}")
        return self.body(x.float())

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(features, digit logits, texture logits)`` in one pass."""
        f = self.features(x)
        return f, self.digit_head(f), self.texture_head(f)

    def forward(self, x: Tensor) -> Tensor:
        """Digit logits ``(n, 10)``."""
        return self.digit_head(self.features(x))

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(features (n, 64), digit logits (n, 10))`` (the :mod:`guidekit.metrics` protocol)."""
        f = self.features(x)
        return f, self.digit_head(f)
