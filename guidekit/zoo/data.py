"""The 8x8 digits of scikit-learn (1797 images, 10 classes), scaled to ``[-1, 1]``, with a fixed split."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DIGITS_SPLIT", "DigitsSplit", "load_digits"]

DIGITS_SPLIT = {"test_size": 0.2, "stratify": "label", "random_state": 0}
"""The split every checkpoint and metric uses (scikit-learn ``train_test_split`` arguments)."""


@dataclass(frozen=True)
class DigitsSplit:
    """Images ``(n, 1, 8, 8)`` in ``[-1, 1]`` (float32) and labels ``(n,)`` (int64) of both splits."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """``(images, labels)`` of ``"train"`` or ``"test"``."""
        if name == "train":
            return self.train_images, self.train_labels
        if name == "test":
            return self.test_images, self.test_labels
        raise ValueError(f"split: expected 'train' or 'test', got {name!r}")


def load_digits() -> DigitsSplit:
    """scikit-learn's digits (shipped inside the wheel, nothing downloads), stratified 80/20, seed 0.

    Pixels ``0..16`` map linearly to ``[-1, 1]``; 1437 train and 360 test images.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - the demo extra installs it
        raise ImportError("the digits data needs scikit-learn: pip install 'guidekit[demo]'") from exc
    data = sk_load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(data.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=DIGITS_SPLIT["test_size"],
        stratify=labels.numpy(),
        random_state=DIGITS_SPLIT["random_state"],
    )
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return DigitsSplit(images[idx_train], labels[idx_train], images[idx_test], labels[idx_test])
