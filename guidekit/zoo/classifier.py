"""The evaluation classifier for 8x8 digits: three convolutions, a 64-d feature layer, ten logits."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["FEATURE_DIM", "DigitsClassifier", "random_shift"]

FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    """A 3-conv CNN on ``(b, 1, 8, 8)`` images in ``[-1, 1]``.

    ``features(x)`` is the 64-d penultimate layer (after ReLU) used for Fréchet distance and k-NN
    precision/recall; ``forward(x)`` returns the ten class logits.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 2 * 2, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``(b, 64)``."""
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # 4x4
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)  # 2x2
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(features (b, 64), logits (b, 10))`` in one pass (the :mod:`guidekit.metrics` protocol)."""
        f = self.features(x)
        return f, self.head(f)


def random_shift(x: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Shift each image ``(b, 1, h, w)`` by up to ``max_shift`` pixels in x and y, filling with background (-1)."""
    _, _, h, w = x.shape
    n = 2 * max_shift + 1
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    shifted = torch.stack([padded[:, :, dy : dy + h, dx : dx + w] for dy in range(n) for dx in range(n)])
    pick = torch.randint(0, n * n, (x.shape[0],), generator=generator)
    return shifted[pick, torch.arange(x.shape[0])]
