"""Figures of a comparison (matplotlib, Agg backend): image grid, quality-vs-fidelity plot, scale-map strip."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..guided import StepRecord
from .cmdline import require_extras

__all__ = ["frontier_plot", "image_grid", "scale_map_strip"]


def _pyplot() -> Any:
    require_extras("guidekit.zoo.figures", ["matplotlib"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


PAD_VALUE = -0.6
"""Value of the separators between tiles: a light grey, distinct from the white (-1) background."""


def _tile(images: Tensor, pad: int = 1) -> Tensor:
    """``(n, 1, h, w)`` images in ``[-1, 1]`` side by side as one ``(h, n (w + pad))`` array."""
    n, _, h, w = images.shape
    row = torch.full((h, n * (w + pad) - pad), PAD_VALUE)
    for i, img in enumerate(images.clamp(-1, 1)):
        row[:, i * (w + pad) : i * (w + pad) + w] = img[0]
    return row


def image_grid(rows: Sequence[tuple[str, Tensor]], path: Path, title: str = "") -> Path:
    """One labelled row of images per ``(label, (n, 1, h, w) images)``; images shown clamped to ``[-1, 1]``.

    Drawn as one picture (fast for many rows): dark ink on white, light grey lines between tiles.
    """
    plt = _pyplot()
    strips = [_tile(images) for _, images in rows]
    height, width = strips[0].shape[0], max(s.shape[1] for s in strips)
    gap = 2
    canvas = torch.full((len(rows) * (height + gap) - gap, width), -1.0)  # white between rows
    for i, strip in enumerate(strips):
        canvas[i * (height + gap) : i * (height + gap) + height, : strip.shape[1]] = strip
    margin = 0.3 + 0.065 * max(len(label) for label, _ in rows)
    img_w, img_h = width * 0.09, canvas.shape[0] * 0.09
    fig_w, fig_h = margin + img_w + 0.2, img_h + (0.55 if title else 0.2)
    fig = plt.figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((margin / fig_w, 0.1 / fig_h, img_w / fig_w, img_h / fig_h))
    ax.imshow(((canvas + 1) / 2).numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest", aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([i * (height + gap) + (height - 1) / 2 for i in range(len(rows))])
    ax.set_yticklabels([label for label, _ in rows], fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.12 / fig_h, va="top")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def frontier_plot(
    rows: Sequence[dict[str, Any]], fidelity: str, quality: str, path: Path, title: str = "", group: str = "family"
) -> Path:
    """``quality`` (lower is better) against the class error ``1 - fidelity`` on a log axis, one line per group.

    Guided samples are nearly always classified right, so fidelity saturates near 1; its complement on a
    log scale keeps the strategies apart. The x axis runs from less to more class-faithful. Rows are
    dicts with ``group``, ``strength``, ``fidelity`` and ``quality`` keys; points are annotated with
    their ``strength``.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    families = list(dict.fromkeys(r[group] for r in rows))
    markers = "os^vD<>pPX*h"
    cmap = plt.get_cmap("tab20")
    for i, fam in enumerate(families):
        pts = [r for r in rows if r[group] == fam]
        xs = [max(1.0 - r["fidelity"], 1e-6) for r in pts]  # 1e-6: a floor for the log axis only
        ys = [r["quality"] for r in pts]
        style = {"lw": 2.5, "color": "black", "zorder": 3} if fam == "cfg" else {"lw": 1.2, "color": cmap(i % 20)}
        ax.plot(xs, ys, marker=markers[i % len(markers)], ms=5, label=fam, **style)
        for r, x, y in zip(pts, xs, ys, strict=True):
            ax.annotate(str(r.get("strength", "")), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel(f"1 - {fidelity}  (log scale; to the right = more class-faithful)")
    ax.set_ylabel(f"{quality}  (lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scale_map_strip(
    records: Sequence[StepRecord],
    samples: Tensor,
    indices: Sequence[int],
    path: Path,
    title: str = "",
    columns: int = 8,
    labels: Tensor | None = None,
) -> Path:
    """Heat maps of the recorded per-point scale, a few steps across, for the samples ``indices``.

    One row per sample: its scale map at ``columns`` evenly spaced steps (shared colour scale, with a
    colour bar), then the final sample (``labels``: the class of each sample, for the row titles).
    Steps without a recorded map (no guidance there) are left out.
    """
    plt = _pyplot()
    steps = [r for r in records if r.scale_map is not None]
    if not steps:
        raise ConfigError("records: expected scale maps (sample with record_scale_maps=True), got none")
    pick = sorted({round(i * (len(steps) - 1) / max(columns - 1, 1)) for i in range(min(columns, len(steps)))})
    shown = [steps[i] for i in pick]
    maps = torch.stack([r.scale_map[list(indices)].float() for r in shown])  # (cols, n, 1, *spatial)
    maps = maps.reshape(*maps.shape[:3], *maps.shape[-2:])[:, :, 0]  # 2-D maps (first frame of video)
    lo, hi = float(maps.min()), float(maps.max())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    n_rows, n_cols = len(indices), len(shown) + 1
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.1 * n_cols + 1.2, 1.15 * n_rows + 0.7), squeeze=False)
    image = None
    for r, idx in enumerate(indices):
        for c, rec in enumerate(shown):
            image = axes[r, c].imshow(maps[c, r].numpy(), cmap="magma", vmin=lo, vmax=hi, interpolation="nearest")
            if r == 0:
                axes[r, c].set_title(f"step {rec.step}\nσ={rec.sigma:.2g}", fontsize=7)
        final = samples[idx].float().clamp(-1, 1)
        final = final.reshape(-1, *final.shape[-2:])[0]
        axes[r, -1].imshow(((final + 1) / 2).numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        name = f"sample {idx}" if labels is None else f"sample {idx}\n(class {int(labels[idx])})"
        axes[r, 0].set_ylabel(name, fontsize=7)
        if r == 0:
            axes[r, -1].set_title("result", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.subplots_adjust(left=0.06, right=0.86, top=0.8 if title else 0.86, bottom=0.03, wspace=0.08, hspace=0.08)
    cax = fig.add_axes((0.88, 0.1, 0.02, 0.7))
    fig.colorbar(image, cax=cax, label="guidance scale")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
