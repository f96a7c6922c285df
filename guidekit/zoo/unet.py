"""A compact class-conditional conv U-net for 8x8 digits (eps prediction on a VP schedule).

8x8 at ``channels[0]`` -> 4x4 at ``channels[1]`` -> back, with residual blocks (GroupNorm, SiLU, conv) whose
features are modulated by FiLM (scale and shift) from the sum of a sinusoidal timestep embedding and a
class embedding. Class index ``NULL_CLASS`` (10) is the unconditional "null" label used by condition dropout.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..ops.timesteps import betas_linear

__all__ = ["NULL_CLASS", "NUM_CLASSES", "DigitsUNet", "ResBlock", "linear_beta_alphas_cumprod", "timestep_embedding"]

NUM_CLASSES = 10
NULL_CLASS = 10


def linear_beta_alphas_cumprod(num_timesteps: int = 1000) -> Tensor:
    """``alphas_cumprod`` of DDPM's linear-beta VP schedule (Ho et al. 2020, §4: 1e-4 .. 0.02), float64 ``(T,)``."""
    return torch.cumprod(1.0 - betas_linear(num_timesteps), dim=0)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``(b, dim)`` of (possibly fractional) timesteps ``t`` ``(b,)`` (Vaswani et al.)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, FiLM from the embedding between them, 1x1 skip when channels change."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int = 8) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1.0 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class DigitsUNet(nn.Module):
    """Class-conditional eps-prediction U-net for ``(b, 1, 8, 8)`` images in ``[-1, 1]``.

    ``forward(x, t, labels)``: ``x`` the noisy VP sample ``sqrt(a) x0 + sqrt(1 - a) eps``, ``t`` the DDPM
    timestep ``(b,)`` or scalar in ``[0, num_timesteps)`` (fractional values are fine), ``labels`` ``(b,)``
    ints in ``0..9`` or ``NULL_CLASS`` (10) for the unconditional prediction. Returns the predicted noise.
    ``alphas_cumprod`` (a buffer) is the schedule the model was trained on.
    """

    prediction = "eps"

    def __init__(self, channels: tuple[int, int] = (32, 64), emb_dim: int = 128, num_timesteps: int = 1000) -> None:
        super().__init__()
        c1, c2 = channels
        self.channels = (c1, c2)
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(NUM_CLASSES + 1, emb_dim)
        self.conv_in = nn.Conv2d(1, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, emb_dim)
        self.downsample = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.down2 = ResBlock(c2, c2, emb_dim)
        self.mid = ResBlock(c2, c2, emb_dim)
        self.up2 = ResBlock(2 * c2, c2, emb_dim)
        self.upsample = nn.Conv2d(c2, c1, 3, padding=1)
        self.up1 = ResBlock(2 * c1, c1, emb_dim)
        self.norm_out = nn.GroupNorm(8, c1)
        self.conv_out = nn.Conv2d(c1, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.register_buffer("alphas_cumprod", linear_beta_alphas_cumprod(num_timesteps), persistent=False)

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def forward(self, x: Tensor, t: Tensor | float, labels: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = F.silu(self.time_mlp(timestep_embedding(t, self.emb_dim)) + self.class_emb(labels))
        h1 = self.down1(self.conv_in(x), emb)
        h2 = self.down2(self.downsample(h1), emb)
        h = self.mid(h2, emb)
        h = self.up2(torch.cat([h, h2], dim=1), emb)
        h = self.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up1(torch.cat([h, h1], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))
