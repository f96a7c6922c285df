"""A small text-to-image-style U-net for 16x16 glyphs: cross-attention to prompt tokens and self-attention.

Layout (``c = channels``)::

    conv_in  1 -> c0                                   16x16
    down0    ResBlock(c0)                               16x16
    down1    Downsample -> ResBlock(c1), self_attn, cross_attn      8x8  (64 tokens)
    mid      Downsample -> ResBlock(c2), self_attn, cross_attn, ResBlock(c2)   4x4  (16 tokens)
    up1      Upsample, cat(down1) -> ResBlock(c1), self_attn, cross_attn      8x8
    up0      Upsample, cat(down0) -> ResBlock(c0)       16x16
    conv_out c0 -> 1

The prompt is two tokens ``[digit, texture]`` (:mod:`.data`), embedded with one table per slot; the
blocks' image tokens attend to them in every ``cross_attn``. The noise level enters every residual block
as a FiLM scale and shift (a sinusoidal timestep embedding); the prompt enters *only* through
cross-attention, as in Stable Diffusion's U-net.

Layer names (for perturbation guidance; ``guidekit.perturbations`` selectors):

* ``down1.self_attn``, ``mid.self_attn``, ``up1.self_attn``: residual self-attention blocks (GroupNorm,
  attention over the level's ``h * w`` tokens, added back).
* ``down1.cross_attn``, ``mid.cross_attn``, ``up1.cross_attn``: residual cross-attention blocks (queries
  from the image tokens, keys and values from the two prompt tokens).
* The ``.attn`` child of each block is its ``torch.nn.MultiheadAttention``: ``mid.self_attn.attn``,
  ``up1.cross_attn.attn``, ... PAG (identity attention), SEG (blurred queries) and SAG select among these
  by regular expression (``"self_attn"``, ``"mid.self_attn"``); a bare ``"mid"`` also picks
  ``mid.cross_attn.attn``, whose calls the self-attention perturbations leave unchanged (a key that is
  not the query is cross-attention), so it perturbs the same layer. NAG (normalized attention) acts on the
  cross-attention ones (``"cross_attn"``, or ``()`` for every one).
* Every block above, and ``down0``, ``down1.res``, ``mid.res1``, ``mid.res2``, ``up1.res``, ``up0``, returns
  its input's shape, so SLG's ``SkipBlocks`` may drop any of them (``"mid.cross_attn"`` removes the
  prompt at the bottleneck).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError, ShapeError
from ..unet import ResBlock, linear_beta_alphas_cumprod, timestep_embedding
from .data import NULL_DIGIT, NULL_TEXTURE, SIZE

__all__ = ["CrossAttentionBlock", "GlyphsUNet", "GlyphsUNetConfig", "SelfAttentionBlock"]


@dataclass(frozen=True)
class GlyphsUNetConfig:
    """Architecture of :class:`GlyphsUNet` (stored beside the checkpoint)."""

    channels: tuple[int, int, int] = (24, 48, 64)
    emb_dim: int = 64
    token_dim: int = 64
    heads: int = 4
    num_timesteps: int = 1000

    def __post_init__(self) -> None:
        if len(self.channels) != 3 or any(c % 8 for c in self.channels):
            raise ConfigError(f"channels: expected three multiples of 8 (GroupNorm groups), got {self.channels!r}")
        if any(c % self.heads for c in self.channels[1:]):
            raise ConfigError(f"heads: expected a divisor of channels[1:] {self.channels[1:]}, got {self.heads!r}")

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> GlyphsUNetConfig:
        d = dict(d)
        d["channels"] = tuple(d["channels"])  # type: ignore[arg-type]
        return cls(**d)  # type: ignore[arg-type]


class SelfAttentionBlock(nn.Module):
    """``x + MHA(norm(x))`` over the ``h * w`` tokens of a feature map; ``.attn`` is the MultiheadAttention."""

    def __init__(self, ch: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(8, ch)
        self.attn = nn.MultiheadAttention(ch, heads, batch_first=True)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, x: Tensor, *context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (b, h*w, c)
        out, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class CrossAttentionBlock(nn.Module):
    """``x + MHA(norm(x), context, context)``: image tokens attend to the prompt tokens; ``.attn`` is an
    ``nn.MultiheadAttention`` with ``kdim = vdim = token_dim`` (NAG's native perturbation acts on it)."""

    def __init__(self, ch: int, token_dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(8, ch)
        self.attn = nn.MultiheadAttention(ch, heads, kdim=token_dim, vdim=token_dim, batch_first=True)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        out, _ = self.attn(self.norm(x).flatten(2).transpose(1, 2), context, context, need_weights=False)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class AttnLevel(nn.Module):
    """A residual block followed by self- and cross-attention (``res``, ``self_attn``, ``cross_attn``)."""

    def __init__(self, c_in: int, c_out: int, cfg: GlyphsUNetConfig) -> None:
        super().__init__()
        self.res = ResBlock(c_in, c_out, cfg.emb_dim)
        self.self_attn = SelfAttentionBlock(c_out, cfg.heads)
        self.cross_attn = CrossAttentionBlock(c_out, cfg.token_dim, cfg.heads)

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        return self.cross_attn(self.self_attn(self.res(x, emb)), context)


class MidLevel(nn.Module):
    """The bottleneck: ``res1``, ``self_attn``, ``cross_attn``, ``res2``."""

    def __init__(self, ch: int, cfg: GlyphsUNetConfig) -> None:
        super().__init__()
        self.res1 = ResBlock(ch, ch, cfg.emb_dim)
        self.self_attn = SelfAttentionBlock(ch, cfg.heads)
        self.cross_attn = CrossAttentionBlock(ch, cfg.token_dim, cfg.heads)
        self.res2 = ResBlock(ch, ch, cfg.emb_dim)

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        return self.res2(self.cross_attn(self.self_attn(self.res1(x, emb)), context), emb)


class PromptEncoder(nn.Module):
    """Prompt tokens ``(b, 2)`` -> context ``(b, 2, token_dim)``: one embedding table per slot (with its null
    token) plus a learned slot position, then a small MLP per token."""

    def __init__(self, token_dim: int) -> None:
        super().__init__()
        self.digit = nn.Embedding(NULL_DIGIT + 1, token_dim)
        self.texture = nn.Embedding(NULL_TEXTURE + 1, token_dim)
        self.position = nn.Parameter(torch.randn(2, token_dim) * 0.02)
        self.mlp = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, token_dim), nn.SiLU())

    def forward(self, tokens: Tensor) -> Tensor:
        context = torch.stack([self.digit(tokens[:, 0]), self.texture(tokens[:, 1])], dim=1) + self.position
        return context + self.mlp(context)


class GlyphsUNet(nn.Module):
    """Prompt-conditional eps-prediction U-net for ``(b, 1, 16, 16)`` glyphs in ``[-1, 1]``.

    ``forward(x, t, tokens)``: ``x`` the noisy VP sample ``sqrt(a) x0 + sqrt(1 - a) eps``, ``t`` the DDPM
    timestep ``(b,)`` or scalar in ``[0, num_timesteps)``, ``tokens`` ``(b, 2)`` prompts ``[digit, texture]``
    (null tokens :data:`~.data.NULL_DIGIT`, :data:`~.data.NULL_TEXTURE`; a ``(2,)`` prompt is broadcast).
    Returns the predicted noise. ``alphas_cumprod`` is the 1000-step linear-beta schedule it was trained on.
    """

    prediction = "eps"

    def __init__(self, config: GlyphsUNetConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or GlyphsUNetConfig()
        c0, c1, c2 = cfg.channels
        e = cfg.emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.prompt = PromptEncoder(cfg.token_dim)
        self.conv_in = nn.Conv2d(1, c0, 3, padding=1)
        self.down0 = ResBlock(c0, c0, e)
        self.downsample0 = nn.Conv2d(c0, c1, 3, stride=2, padding=1)
        self.down1 = AttnLevel(c1, c1, cfg)
        self.downsample1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.mid = MidLevel(c2, cfg)
        self.upsample1 = nn.Conv2d(c2, c1, 3, padding=1)
        self.up1 = AttnLevel(2 * c1, c1, cfg)
        self.upsample0 = nn.Conv2d(c1, c0, 3, padding=1)
        self.up0 = ResBlock(2 * c0, c0, e)
        self.norm_out = nn.GroupNorm(8, c0)
        self.conv_out = nn.Conv2d(c0, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.register_buffer("alphas_cumprod", linear_beta_alphas_cumprod(cfg.num_timesteps), persistent=False)

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def attention_layers(self) -> dict[str, str]:
        """``{name: "self" | "cross"}`` of the attention blocks (the documented layer naming)."""
        return {
            name: "self" if isinstance(m, SelfAttentionBlock) else "cross"
            for name, m in self.named_modules()
            if isinstance(m, SelfAttentionBlock | CrossAttentionBlock)
        }

    def forward(self, x: Tensor, t: Tensor | float, tokens: Tensor) -> Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, SIZE, SIZE):
            raise ShapeError(f"x: expected (b, 1, {SIZE}, {SIZE}) glyphs, got {tuple(x.shape)}")
        b = x.shape[0]
        tokens = torch.as_tensor(tokens, dtype=torch.int64, device=x.device)
        if tokens.ndim == 1:
            tokens = tokens.expand(b, -1)
        if tokens.shape != (b, 2):
            raise ShapeError(f"tokens: expected ({b}, 2) prompts [digit, texture], got {tuple(tokens.shape)}")
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(b)
        emb = F.silu(self.time_mlp(timestep_embedding(t, self.config.emb_dim)))
        context = self.prompt(tokens)
        h0 = self.down0(self.conv_in(x), emb)
        h1 = self.down1(self.downsample0(h0), emb, context)
        h = self.mid(self.downsample1(h1), emb, context)
        h = self.upsample1(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up1(torch.cat([h, h1], dim=1), emb, context)
        h = self.upsample0(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up0(torch.cat([h, h0], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def parameter_count(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())
