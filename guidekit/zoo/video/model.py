"""A small class-conditional video denoiser over ``(b, c, f, h, w)``: a factorised space-time U-Net.

Spatial ``1x3x3`` and temporal ``3x1x1`` convolutions (a "(2+1)D" network, Tran et al. 2018) at 16x16 and
8x8, and full space-time self-attention over the ``f x 4 x 4`` tokens of the bottleneck. Conditioning on
the noise level and the class (index ``num_classes`` = the null class of classifier-free guidance) enters
every residual block as a FiLM scale and shift.

The network is wrapped in EDM preconditioning (Karras et al. 2022, Table 1): for ``x = x0 + sigma * n``,
``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)``, so :class:`VideoDenoiser` returns the denoised
``x0`` directly (prediction space ``"x0"``, VE/EDM coordinates).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError, ShapeError
from ...ops.shapes import from_canonical, to_canonical

__all__ = ["VideoDenoiser", "VideoDenoiserConfig"]


@dataclass(frozen=True)
class VideoDenoiserConfig:
    """Architecture of :class:`VideoDenoiser` (stored beside the checkpoint)."""

    frames: int = 8
    size: int = 16
    in_channels: int = 1
    widths: tuple[int, int, int] = (16, 32, 64)
    emb_dim: int = 128
    num_classes: int = 10
    heads: int = 4
    sigma_data: float = 0.5

    def __post_init__(self) -> None:
        if self.size % 4:
            raise ConfigError(f"size: expected a multiple of 4, got {self.size!r}")
        if any(w % 8 for w in self.widths):
            raise ConfigError(f"widths: expected multiples of 8 (GroupNorm groups), got {self.widths!r}")

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> VideoDenoiserConfig:
        d = dict(d)
        d["widths"] = tuple(d["widths"])  # type: ignore[arg-type]
        return cls(**d)  # type: ignore[arg-type]


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(8, ch)


class ResBlock(nn.Module):
    """Two spatial convolutions and one temporal convolution, FiLM-conditioned, with a residual path."""

    def __init__(self, ch_in: int, ch_out: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = _norm(ch_in)
        self.conv1 = nn.Conv3d(ch_in, ch_out, (1, 3, 3), padding=(0, 1, 1))
        self.film = nn.Linear(emb_dim, 2 * ch_out)
        self.norm2 = _norm(ch_out)
        self.conv2 = nn.Conv3d(ch_out, ch_out, (1, 3, 3), padding=(0, 1, 1))
        self.norm_t = _norm(ch_out)
        self.conv_t = nn.Conv3d(ch_out, ch_out, (3, 1, 1), padding=(1, 0, 0))
        self.skip = nn.Conv3d(ch_in, ch_out, 1) if ch_in != ch_out else nn.Identity()
        nn.init.zeros_(self.conv_t.weight)
        nn.init.zeros_(self.conv_t.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        h = h + self.skip(x)
        return h + self.conv_t(F.silu(self.norm_t(h)))


class SpaceTimeAttention(nn.Module):
    """Self-attention over all ``f * h * w`` positions of a (small) feature map, with a residual path."""

    def __init__(self, ch: int, heads: int) -> None:
        super().__init__()
        self.norm = _norm(ch)
        self.attn = nn.MultiheadAttention(ch, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        b, c, f, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (b, f*h*w, c)
        out, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return x + out.transpose(1, 2).reshape(b, c, f, h, w)


class _UNet(nn.Module):
    """The raw network ``F(x; c_noise, label)`` of the EDM preconditioning."""

    def __init__(self, cfg: VideoDenoiserConfig) -> None:
        super().__init__()
        w0, w1, w2 = cfg.widths
        e = cfg.emb_dim
        self.freqs = nn.Parameter(torch.randn(e // 2) * 4.0, requires_grad=False)  # random Fourier features
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.class_emb = nn.Embedding(cfg.num_classes + 1, e)
        self.inp = nn.Conv3d(cfg.in_channels, w0, (1, 3, 3), padding=(0, 1, 1))
        self.enc0 = ResBlock(w0, w0, e)
        self.down0 = nn.Conv3d(w0, w1, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.enc1 = ResBlock(w1, w1, e)
        self.down1 = nn.Conv3d(w1, w2, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.mid1 = ResBlock(w2, w2, e)
        self.attn = SpaceTimeAttention(w2, cfg.heads)
        self.mid2 = ResBlock(w2, w2, e)
        self.dec1 = ResBlock(w2 + w1, w1, e)
        self.dec0 = ResBlock(w1 + w0, w0, e)
        self.out_norm = _norm(w0)
        self.out = nn.Conv3d(w0, cfg.in_channels, (1, 3, 3), padding=(0, 1, 1))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor) -> Tensor:
        phase = 2 * math.pi * c_noise[:, None] * self.freqs[None]
        emb = self.time_mlp(torch.cat([phase.cos(), phase.sin()], dim=1)) + self.class_emb(labels)
        emb = F.silu(emb)
        h0 = self.enc0(self.inp(x), emb)
        h1 = self.enc1(self.down0(h0), emb)
        h = self.mid1(self.down1(h1), emb)
        h = self.mid2(self.attn(h), emb)
        h = self.dec1(torch.cat([_up(h), h1], dim=1), emb)
        h = self.dec0(torch.cat([_up(h), h0], dim=1), emb)
        return self.out(F.silu(self.out_norm(h)))


def _check_layout(layout: str) -> str:
    if layout not in ("b c f h w", "b f c h w"):
        raise ConfigError(f"layout: expected 'b c f h w' or 'b f c h w', got {layout!r}")
    return layout


def _up(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")


class VideoDenoiser(nn.Module):
    """Class-conditional EDM denoiser ``D(x; sigma, label) -> x0`` on clips ``(b, c, f, h, w)``.

    Args:
        config: the architecture.
        layout: the layout of the tensors this module takes and returns: ``"b c f h w"`` (default; Wan,
            ModelScope) or ``"b f c h w"`` (CogVideoX). The network itself always runs on
            ``(b, c, f, h, w)``; the second layout exists so the guided loop's layout handling is exercised.

    Call: ``model(x, sigma, labels)`` with ``x`` in EDM coordinates (``x0 + sigma * noise``), ``sigma`` a
    float or ``(b,)`` tensor, ``labels`` ``(b,)`` ints in ``0 .. num_classes`` (``num_classes`` = null).
    """

    prediction: str = "x0"

    def __init__(self, config: VideoDenoiserConfig | None = None, layout: str = "b c f h w") -> None:
        super().__init__()
        self.config = config or VideoDenoiserConfig()
        self.layout = _check_layout(layout)
        self.net = _UNet(self.config)

    @property
    def null_label(self) -> int:
        """The label of the unconditional branch."""
        return self.config.num_classes

    def with_layout(self, layout: str) -> VideoDenoiser:
        """The same network (shared weights) taking and returning tensors in ``layout``."""
        if layout == self.layout:
            return self
        other = VideoDenoiser.__new__(VideoDenoiser)
        nn.Module.__init__(other)
        other.config, other.net = self.config, self.net
        other.layout = _check_layout(layout)
        return other.train(self.training)

    def clip_shape(self, batch: int) -> tuple[int, ...]:
        """The shape of ``batch`` clips in this module's layout."""
        cfg = self.config
        if self.layout == "b c f h w":
            return (batch, cfg.in_channels, cfg.frames, cfg.size, cfg.size)
        return (batch, cfg.frames, cfg.in_channels, cfg.size, cfg.size)

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor) -> Tensor:
        expected = self.clip_shape(x.shape[0]) if x.ndim == 5 else None
        if tuple(x.shape) != expected:
            raise ShapeError(f"x: expected a clip batch {self.layout!r} = {expected}, got {tuple(x.shape)}")
        x = to_canonical(x, self.layout)
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
        labels = torch.as_tensor(labels, dtype=torch.int64, device=x.device).reshape(-1).expand(b)
        sd = self.config.sigma_data
        s = sigma.view(b, 1, 1, 1, 1)
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        c_noise = sigma.clamp_min(1e-20).log() / 4
        out = c_skip * x.float() + c_out * self.net(c_in * x.float(), c_noise, labels)
        return from_canonical(out.to(x.dtype), self.layout)
