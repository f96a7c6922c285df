"""Video metrics: per-frame fidelity, per-frame Fréchet distance, temporal consistency and overshoot.

Clips are ``(b, c, f, h, w)`` (pass ``layout="b f c h w"`` for CogVideoX-style tensors) with data in
``[-1, 1]``. Temporal consistency has two parts, both zero for a perfectly steady clip:

* :func:`motion_compensated_difference`: the mean squared difference between consecutive frames after
  aligning them by the best integer shift (a brute-force block-matching motion compensation over the
  whole frame). A static clip, or one whose frames are integer translates of each other, scores 0;
  flicker, shape changes and noise that differs from frame to frame do not cancel.
* :func:`class_flicker`: how much a per-frame classifier's belief varies across the clip (the variance
  of its softmax output over frames, summed over classes), and :func:`label_switch_rate`, the share of
  consecutive frame pairs whose arg-max class differs.

Real clips move sub-pixel and drift in brightness, so their scores are small but not zero: compare a
model's numbers with those of real clips (:func:`video_metrics` reports both and their ratio).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from ..ops.shapes import to_canonical
from .classify import class_accuracy
from .frechet import frechet_distance
from .pixels import overshoot
from .suite import FeatureClassifier

__all__ = [
    "VideoReference",
    "class_flicker",
    "frames_of",
    "label_switch_rate",
    "motion_compensated_difference",
    "video_metrics",
    "video_reference",
]


def _clips(video: Tensor, layout: str) -> Tensor:
    if not isinstance(video, Tensor) or video.ndim != 5:
        shape = tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__
        raise ShapeError(f"video: expected a 5-D clip batch in layout {layout!r}, got {shape}")
    return to_canonical(video, layout)


def frames_of(video: Tensor, layout: str = "b c f h w") -> Tensor:
    """The frames of clips as one image batch ``(b * f, c, h, w)``, clip-major (frame ``t`` of clip ``i`` at
    row ``i * f + t``)."""
    x = _clips(video, layout)
    b, c, f, h, w = x.shape
    return x.transpose(1, 2).reshape(b * f, c, h, w)


def motion_compensated_difference(
    video: Tensor, max_shift: int = 2, layout: str = "b c f h w", relative: bool = False
) -> Tensor:
    """Per clip ``(b,)``: mean over consecutive frame pairs of ``min_s MSE(frame_{t+1}, shift_s(frame_t))``.

    ``s`` ranges over integer shifts ``(dy, dx)`` with ``|dy|, |dx| <= max_shift``. Both frames are compared
    on the interior that every shift keeps inside the frame (a border of ``max_shift`` pixels is dropped),
    so nothing is padded or wrapped. A clip whose frames are integer translates (by at most ``max_shift``)
    of one image with an empty border scores exactly 0; a static clip scores 0 for any ``max_shift``.

    With ``relative=True`` each pair's error is divided by the mean pixel variance of its two frames, which
    makes the score invariant to affine intensity changes ``a x + b`` of the clip: a guidance strategy that
    only raises contrast does not look less consistent for it.
    """
    x = _clips(video, layout).to(torch.float64)
    b, _, f, h, w = x.shape
    if not (isinstance(max_shift, int) and max_shift >= 0):
        raise ConfigError(f"max_shift: expected an int >= 0, got {max_shift!r}")
    if 2 * max_shift >= min(h, w):
        raise ConfigError(f"max_shift: expected less than half the frame side {min(h, w)}, got {max_shift}")
    if f < 2:
        raise ShapeError(f"video: expected at least 2 frames, got {f}")
    s = max_shift
    prev, nxt = x[:, :, :-1], x[:, :, 1:]
    target = nxt[..., s : h - s, s : w - s]
    best = torch.full((b, f - 1), float("inf"), dtype=torch.float64, device=x.device)
    for dy in range(-s, s + 1):
        for dx in range(-s, s + 1):
            # content at p in frame t moves to p + (dy, dx) in frame t+1
            moved = prev[..., s - dy : h - s - dy, s - dx : w - s - dx]
            best = torch.minimum(best, (target - moved).square().mean(dim=(1, 3, 4)))
    if relative:
        var = x.var(dim=(1, 3, 4), unbiased=False)  # (b, f) per-frame variance over channels and pixels
        best = best / ((var[:, 1:] + var[:, :-1]) / 2).clamp_min(1e-12)
    return best.mean(dim=1)


def _check_probs(probs: Tensor) -> None:
    if not isinstance(probs, Tensor) or probs.ndim != 3 or probs.shape[1] < 2:
        shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ShapeError(f"probs: expected per-frame class probabilities (b, f >= 2, classes), got {shape}")


def class_flicker(probs: Tensor) -> Tensor:
    """Per clip ``(b,)``: variance over frames of the per-frame class probabilities, summed over classes.

    0 when every frame gets the same belief; at most ``1 - 1/f``-ish when frames flip between confident
    classes. ``probs`` is ``(b, f, classes)``.
    """
    _check_probs(probs)
    return probs.to(torch.float64).var(dim=1, unbiased=False).sum(dim=-1)


def label_switch_rate(probs: Tensor) -> Tensor:
    """Per clip ``(b,)``: share of consecutive frame pairs whose arg-max class differs."""
    _check_probs(probs)
    top = probs.argmax(dim=-1)
    return (top[:, 1:] != top[:, :-1]).to(torch.float64).mean(dim=1)


@dataclass(frozen=True)
class VideoReference:
    """Real clips embedded once: per-frame features ``(n * f, d)`` and their temporal scores.

    Attributes:
        features: per-frame classifier features of the real clips.
        mc_diff: mean :func:`motion_compensated_difference` of the real clips.
        flicker: mean :func:`class_flicker` of the real clips.
        clips: number of real clips.
        max_shift: the ``max_shift`` ``mc_diff`` was measured with.
    """

    features: Tensor
    mc_diff: float
    flicker: float
    clips: int
    max_shift: int = 2


def _embed(classifier: FeatureClassifier, video: Tensor, batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Per-frame ``(features (b*f, d), probabilities (b, f, k))`` of clips ``(b, c, f, h, w)``."""
    b, f = video.shape[0], video.shape[2]
    feats, logits = [], []
    with torch.no_grad():
        for chunk in frames_of(video).split(batch_size):
            fe, lg = classifier.features_and_logits(chunk)
            feats.append(fe)
            logits.append(lg)
    lg = torch.cat(logits)
    return torch.cat(feats), torch.softmax(lg.to(torch.float64), dim=-1).reshape(b, f, -1)


def video_reference(
    classifier: FeatureClassifier, video: Tensor, max_shift: int = 2, layout: str = "b c f h w"
) -> VideoReference:
    """Embed real clips (in ``[-1, 1]``) as the reference of :func:`video_metrics`."""
    x = _clips(video, layout)
    features, probs = _embed(classifier, x)
    return VideoReference(
        features=features,
        mc_diff=float(motion_compensated_difference(x, max_shift).mean()),
        flicker=float(class_flicker(probs).mean()),
        clips=int(x.shape[0]),
        max_shift=max_shift,
    )


def video_metrics(
    samples: Tensor,
    labels: Tensor,
    classifier: FeatureClassifier,
    reference: VideoReference,
    layout: str = "b c f h w",
) -> dict[str, float]:
    """Metrics of raw generated clips ``samples`` (before any clamp) made for class ``labels`` ``(b,)``.

    The classifier and the temporal scores see the clips clamped to ``[-1, 1]`` (as a saved video);
    overshoot is measured on the raw values. Returns:

    * ``acc``: per-frame accuracy of the requested label; ``p_y``: its mean per-frame probability (smooth,
      for matching strategies at equal fidelity); ``clip_acc``: accuracy of the frame-averaged probabilities;
    * ``fd``: Fréchet distance of per-frame features against the reference frames (compare only at equal
      numbers of clips);
    * ``mc_diff`` and ``mc_ratio``: motion-compensated frame difference, and its ratio to the real clips';
      ``mc_rel``: the same relative to frame variance (``relative=True``; blind to contrast changes);
    * ``flicker`` and ``flicker_ratio``: :func:`class_flicker` and its ratio to the real clips';
      ``switch``: :func:`label_switch_rate`;
    * ``over_share``, ``over_mean``: :func:`guidekit.metrics.overshoot` of the raw values (share of
      ``|x| > 1.1``, mean excess beyond 1); ``sat``: share of ``|x| > 1``.
    """
    x = _clips(samples, layout)
    if not isinstance(labels, Tensor) or labels.shape != (x.shape[0],):
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ShapeError(f"labels: expected ({x.shape[0]},), one class per clip, got {got}")
    shown = x.clamp(-1.0, 1.0)
    features, probs = _embed(classifier, shown)
    f = x.shape[2]
    frame_labels = labels.to(probs.device).repeat_interleave(f)
    mc = float(motion_compensated_difference(shown, reference.max_shift).mean())
    mc_rel = float(motion_compensated_difference(shown, reference.max_shift, relative=True).mean())
    flick = float(class_flicker(probs).mean())
    over_share, over_mean = overshoot(x)
    return {
        "acc": class_accuracy(probs.reshape(-1, probs.shape[-1]), frame_labels),
        "p_y": float(probs.reshape(-1, probs.shape[-1]).gather(1, frame_labels[:, None]).mean()),
        "clip_acc": class_accuracy(probs.mean(dim=1), labels.to(probs.device)),
        "fd": frechet_distance(features, reference.features),
        "mc_diff": mc,
        "mc_ratio": mc / reference.mc_diff if reference.mc_diff > 0 else float("inf"),
        "mc_rel": mc_rel,
        "flicker": flick,
        "flicker_ratio": flick / reference.flicker if reference.flicker > 0 else float("inf"),
        "switch": float(label_switch_rate(probs).mean()),
        "over_share": over_share,
        "over_mean": over_mean,
        "sat": float((x.abs() > 1.0).to(torch.float64).mean()),
    }
