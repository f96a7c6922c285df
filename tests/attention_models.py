"""A tiny EDM denoiser with one self-attention and one cross-attention (``nn.MultiheadAttention``), for the
attention-guidance tests (NAG, SAG, S-CFG): ``mid.self_attn`` over the 8x8 token grid, ``up1.cross_attn``
from the grid to ``TOKENS`` context tokens embedded from a class label (``NULL`` is the null label)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

TOKENS, CLASSES, NULL = 3, 4, 4


class _Block(nn.Module):
    def __init__(self, attn: nn.MultiheadAttention) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(attn.embed_dim)
        setattr(self, "self_attn" if attn.kdim == attn.embed_dim else "cross_attn", attn)


class TinyAttentionNet(nn.Module):
    """``model(x, sigma, labels) -> x0`` on ``(b, 2, 8, 8)``; weights drawn from ``seed`` (untrained)."""

    def __init__(self, seed: int = 0, dim: int = 16, context_dim: int = 12, heads: int = 2) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Conv2d(2, dim, 3, padding=1)
        self.time = nn.Linear(1, dim)
        self.mid = _Block(nn.MultiheadAttention(dim, heads, batch_first=True))
        self.up1 = _Block(nn.MultiheadAttention(dim, heads, kdim=context_dim, vdim=context_dim, batch_first=True))
        self.context = nn.Embedding(CLASSES + 1, TOKENS * context_dim)
        self.out = nn.Conv2d(dim, 2, 3, padding=1)
        self.context_dim = context_dim

    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor) -> Tensor:
        s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        c_in, c_skip, c_out = 1 / (s**2 + 1).sqrt(), 1 / (s**2 + 1), s / (s**2 + 1).sqrt()
        h = self.inp(x * c_in) + self.time(s.log().reshape(-1, 1) / 4)[..., None, None]
        b, d, hh, ww = h.shape
        t = h.flatten(2).transpose(1, 2)
        n = self.mid.norm(t)
        t = t + self.mid.self_attn(n, n, n, need_weights=False)[0]
        ctx = self.context(labels).view(b, TOKENS, self.context_dim)
        t = t + self.up1.cross_attn(self.up1.norm(t), ctx, ctx, need_weights=False)[0]
        return c_skip * x + c_out * self.out(t.transpose(1, 2).reshape(b, d, hh, ww))
