"""Sample and evaluate the moving-digits video model with any guidance strategy, in either 5-D layout."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...errors import ConfigError
from ...metrics.video import VideoReference, video_metrics, video_reference
from ...strategies.base import GuidanceStrategy
from .classifier import FrameClassifier
from .data import MotionConfig, make_clips
from .model import VideoDenoiser

__all__ = ["EvalSetting", "balanced_labels", "evaluate", "real_reference", "sample_clips"]

SIGMA_MAX = 80.0
"""EDM's largest noise level; the sampler starts from ``x_T = SIGMA_MAX * randn``."""


def balanced_labels(per_class: int, num_classes: int = 10) -> Tensor:
    """``(per_class * num_classes,)`` labels ``0, 1, .., 9, 0, 1, ..``."""
    if not (isinstance(per_class, int) and per_class >= 1):
        raise ConfigError(f"per_class: expected a positive int, got {per_class!r}")
    return torch.arange(num_classes).repeat(per_class)


def initial_noise(model: VideoDenoiser, n: int, seed: int, layout: str = "b c f h w") -> Tensor:
    """``x_T`` for ``n`` clips in ``layout``: clip ``i`` gets its own generator (seed ``seed * 100003 + i``),
    so a clip does not depend on the batch it is drawn in, nor on the layout."""
    shape = model.with_layout("b c f h w").clip_shape(1)[1:]
    noise = torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100_003 + i)) for i in range(n)]
    )
    noise = noise * SIGMA_MAX
    return noise if layout == "b c f h w" else noise.transpose(1, 2).contiguous()


def sample_clips(
    model: VideoDenoiser,
    labels: Tensor,
    strategy: GuidanceStrategy | Mapping[str, Any] | str | None = None,
    *,
    steps: int = 20,
    sampler: str = "euler",
    seed: int = 0,
    layout: str = "b c f h w",
    batch_size: int = 50,
) -> Tensor:
    """Raw clips (no clamp) for ``labels`` ``(b,)``, returned in ``layout``, via :func:`guidekit.sample`.

    The network runs in ``layout`` (``"b f c h w"`` is the CogVideoX order) and the loop's ``layout=``
    option turns it into ``(b, c, f, h, w)`` for the sampler and the strategy, so both layouts give the
    same clips. Strategy ``None`` is the conditional model alone.
    """
    from ...guided import sample

    net = model.with_layout(layout)
    null = torch.full_like(labels, model.null_label)
    x_T = initial_noise(model, len(labels), seed, layout)
    out = []
    with torch.no_grad():
        for i in range(0, len(labels), batch_size):
            sl = slice(i, i + batch_size)
            out.append(
                sample(
                    net, x_T[sl], sampler=sampler, steps=steps, strategy=strategy, cond=labels[sl],
                    uncond=null[sl], prediction="edm", layout=layout, progress=False,
                )
            )  # fmt: skip
    return torch.cat(out)


def real_reference(
    classifier: FrameClassifier, clips: int = 200, seed: int = 7, motion: MotionConfig | None = None
) -> tuple[VideoReference, Tensor]:
    """Real test-split clips (class-balanced) embedded as the metric reference; also returns the clips."""
    per_class = max(1, clips // 10)
    real = make_clips(10 * per_class, seed=seed, split="test", motion=motion, labels=balanced_labels(per_class))
    return video_reference(classifier, real.video), real.video


@dataclass(frozen=True)
class EvalSetting:
    """One evaluation run: how many clips, how they are sampled."""

    per_class: int = 10
    steps: int = 20
    sampler: str = "euler"
    seed: int = 0
    layout: str = "b c f h w"


def evaluate(
    model: VideoDenoiser,
    classifier: FrameClassifier,
    reference: VideoReference,
    strategy: GuidanceStrategy | Mapping[str, Any] | str | None,
    setting: EvalSetting = EvalSetting(),
) -> tuple[dict[str, float], Tensor]:
    """:func:`guidekit.metrics.video.video_metrics` of clips sampled with ``strategy``; also the raw clips."""
    labels = balanced_labels(setting.per_class)
    clips = sample_clips(
        model, labels, strategy, steps=setting.steps, sampler=setting.sampler, seed=setting.seed, layout=setting.layout
    )
    return video_metrics(clips, labels, classifier, reference, layout=setting.layout), clips
