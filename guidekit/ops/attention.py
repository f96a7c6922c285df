"""Attention-space formulas of perturbation guidance (SEG's query blur, NAG's normalised extrapolation)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = [
    "INFINITE_BLUR",
    "attended_mask",
    "blur_queries",
    "gaussian_blur",
    "mha_heads",
    "normalized_attention",
    "region_rates",
    "scfg_smooth",
    "semantic_regions",
    "token_grid",
]

INFINITE_BLUR = 9999.0
"""A query blur sigma at or above this is the infinite blur (the official SEG threshold)."""


def blur_queries(query: Tensor, sigma: float, token_dim: int = 1) -> Tensor:
    """SEG's blur of ``query`` ``(b, n, d)`` (tokens along ``token_dim``): the mean over tokens for an
    infinite ``sigma``, else a separable Gaussian over the square ``sqrt(n) x sqrt(n)`` token grid."""
    if sigma >= INFINITE_BLUR:
        return query.mean(dim=token_dim, keepdim=True).expand_as(query)
    q = query.movedim(token_dim, 1)
    b, n, d = q.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ConfigError(
            f"sigma: a finite query blur needs a square token grid, got {n} tokens (use an infinite blur)"
        )
    size = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    size = min(size, side - (side % 2 - 1))
    t = torch.arange(size, dtype=q.dtype, device=q.device) - (size - 1) / 2
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    grid = q.permute(0, 2, 1).reshape(b * d, 1, side, side)
    pad = size // 2
    grid = F.conv2d(F.pad(grid, (pad, pad, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    grid = F.conv2d(F.pad(grid, (0, 0, pad, pad), mode="reflect"), k.view(1, 1, -1, 1))
    return grid.reshape(b, d, n).permute(0, 2, 1).movedim(1, token_dim)


def mha_heads(
    module: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``nn.MultiheadAttention``'s projected queries, keys and values split into heads, ``(b, heads, n, d)``,
    from batch-first inputs (``value=None`` skips the values)."""
    e, h = module.embed_dim, module.num_heads
    if module._qkv_same_embed_dim:
        wq, wk, wv = module.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    bq, bk, bv = (None, None, None) if module.in_proj_bias is None else module.in_proj_bias.chunk(3)
    b = query.shape[0]

    def split(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, w, bias).view(b, -1, h, e // h).transpose(1, 2)

    return split(query, wq, bq), split(key, wk, bk), None if value is None else split(value, wv, bv)


def normalized_attention(z_pos: Tensor, z_neg: Tensor, scale: float, tau: float, alpha: float) -> Tensor:
    """NAG's attention-space guidance (Chen et al. 2025, arXiv 2505.21179) on attention outputs ``(..., d)``.

    ``z̃ = φ z⁺ − (φ − 1) z⁻`` (``φ = scale``), scaled down per token so that ``‖z̃‖₁ ≤ τ ‖z⁺‖₁``, then
    blended: ``α z̃ + (1 − α) z⁺``. Norms run over the last dim (the heads' features, merged). A token whose
    ``z̃`` is zero is left unscaled (no division by zero); ``scale = 1`` gives ``z⁺``.
    """
    guided = z_pos * scale - z_neg * (scale - 1.0)
    n_pos = z_pos.abs().sum(-1, keepdim=True)
    n_guided = guided.abs().sum(-1, keepdim=True)
    over = n_guided > tau * n_pos
    factor = torch.where(over, tau * n_pos / torch.where(over, n_guided, torch.ones_like(n_guided)), 1.0)
    return alpha * (guided * factor) + (1.0 - alpha) * z_pos


def token_grid(tokens: int, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """The grid of ``tokens`` attention tokens over a sample of ``spatial`` dims: each dim divided by one
    power-of-two factor, rounded up (a UNet level; a video's frames may keep their count). Refused by name
    when no such grid has ``tokens`` cells."""
    for f in (1, 2, 4, 8, 16, 32, 64):
        grid = tuple(-(-s // f) for s in spatial)
        if math.prod(grid) == tokens:
            return grid
        if len(spatial) == 3 and spatial[0] * math.prod(grid[1:]) == tokens:
            return (spatial[0], *grid[1:])
    raise ConfigError(
        f"attention map: expected a token count that tiles the sample's {spatial} grid at one downsampling, "
        f"got {tokens} tokens"
    )


def attended_mask(attention: Tensor, spatial: tuple[int, ...], threshold: float = 1.0) -> Tensor:
    """SAG's mask ``(b, 1, *spatial)``: the tokens whose received attention, summed over queries (``attention``
    ``(b, queries, keys)``, heads averaged), exceeds ``threshold`` (1 is the mean), nearest-upsampled."""
    b, _, keys = attention.shape
    grid = token_grid(keys, spatial)
    mask = (attention.sum(1) > threshold).to(attention.dtype).reshape(b, 1, *grid)
    return mask if grid == spatial else F.interpolate(mask, size=spatial, mode="nearest")


def gaussian_blur(x: Tensor, sigma: float, kernel_size: int = 9) -> Tensor:
    """A normalised Gaussian of ``kernel_size`` taps (``sigma`` in pixels) over the last two dims of ``x``
    (the last one for 1-D samples), reflect padding; the kernel is clipped to dims shorter than it."""
    dims = [-1] if x.ndim < 4 else [-2, -1]
    out = x
    for dim in dims:
        n = out.shape[dim]
        size = min(kernel_size, 2 * (n - 1) + 1)
        t = torch.linspace(-(size - 1) / 2, (size - 1) / 2, size, dtype=x.dtype, device=x.device)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        k = k / k.sum()
        moved = out.movedim(dim, -1)
        flat = moved.reshape(-1, 1, n)
        flat = F.conv1d(F.pad(flat, (size // 2, size // 2), mode="reflect"), k.view(1, 1, -1))
        out = flat.reshape(moved.shape).movedim(-1, dim)
    return out


# -- S-CFG: semantic regions from attention maps --------------------------------------------------------------
def _planes(t: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``(b, k, *spatial)`` as 2-D planes ``(b·F, k, H, W)`` (leading spatial dims folded into the batch; a
    1-D sample is one row), with what :func:`_unplanes` needs to undo it."""
    b, k, *spatial = t.shape
    if len(spatial) == 1:
        return t.reshape(b, k, 1, spatial[0]), (b, k, *spatial)
    lead = math.prod(spatial[:-2])
    planes = t.reshape(b, k, lead, *spatial[-2:]).movedim(2, 1).reshape(b * lead, k, *spatial[-2:])
    return planes, (b, k, *spatial)


def _unplanes(planes: Tensor, shape: tuple[int, ...]) -> Tensor:
    b, _, *spatial = shape
    k = planes.shape[1]
    if len(spatial) == 1:
        return planes.reshape(b, k, *spatial)
    lead = math.prod(spatial[:-2])
    return planes.reshape(b, lead, k, *spatial[-2:]).movedim(1, 2).reshape(b, k, *spatial)


def scfg_smooth(t: Tensor) -> Tensor:
    """S-CFG's 3x3 smoothing of ``(b, k, *spatial)`` over the last two dims: the official ``GaussianSmoothing(3,
    0.5)``, whose kernel is ``exp(-(x / (2σ))²)`` (an effective σ of √2·0.5), normalised; reflect padding
    (replicate on a dim of one)."""
    planes, shape = _planes(t)
    x = torch.tensor([-1.0, 0.0, 1.0], dtype=t.dtype, device=t.device)
    k1 = torch.exp(-((x / (2 * 0.5)) ** 2))
    kernel = torch.outer(k1, k1)
    kernel = (kernel / kernel.sum()).expand(planes.shape[1], 1, 3, 3).contiguous()
    h, w = planes.shape[-2:]
    mode = "reflect" if h > 1 and w > 1 else "replicate"
    out = F.conv2d(F.pad(planes, (1, 1, 1, 1), mode=mode), kernel, groups=planes.shape[1])
    return _unplanes(out, shape)


def semantic_regions(pairs: list[tuple[Tensor, Tensor]], spatial: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """S-CFG's per-token and foreground maps (Shen et al., CVPR 2024, official ``get_mask``).

    ``pairs`` are ``(self map (b, n, n), cross map (b, n, T))`` of one layer each, heads averaged. Per layer:
    ``S̃ = (S + 3 S²) / 4`` (the official loop; the paper's ``Σ_k S^k / R`` with R = 4 is not what it runs),
    ``A = S̃ · CA`` on the layer's token grid, bilinearly upsampled to the finest grid among the layers,
    smoothed (:func:`scfg_smooth`) and divided per token by its spatial mean; the foreground pair
    ``(A_0, Σ_{t>0} A_t)`` likewise. Both are averaged over layers. Returns ``(regions (b, T, *grid),
    foreground (b, 2, *grid))`` on the finest grid.
    """
    grids = [token_grid(sa.shape[1], spatial) for sa, _ in pairs]
    finest = max(grids, key=math.prod)
    total_ca: Tensor | float = 0.0
    total_fore: Tensor | float = 0.0
    for (sa, ca), grid in zip(pairs, grids, strict=True):
        smoothed = (sa + 3 * (sa @ sa)) / 4
        a = (smoothed @ ca).transpose(1, 2).reshape(ca.shape[0], ca.shape[2], *grid)
        if grid != finest:
            planes, _ = _planes(a)
            target = (1, finest[-1]) if len(finest) == 1 else finest[-2:]
            up = F.interpolate(planes, size=target, mode="bilinear", align_corners=False)
            a = _unplanes(up, (a.shape[0], a.shape[1], *finest))
        a = scfg_smooth(a)
        dims = tuple(range(2, a.ndim))
        total_ca = total_ca + a / (a.mean(dim=dims, keepdim=True) + 1e-8)
        fore = torch.stack([a[:, 0], a[:, 1:].sum(1)], dim=1)
        total_fore = total_fore + fore / fore.mean(dim=dims, keepdim=True)
    return total_ca / len(pairs), total_fore / len(pairs)  # type: ignore[return-value]


def region_rates(delta: Tensor, regions: Tensor, foreground: Tensor, low: float, high: float, cap: float) -> Tensor:
    """S-CFG's scale map ``(b, 1, *spatial)`` from ``Δ = c − u`` and the masks (official ``sd.py``).

    ``regions`` ``(b, T, *spatial)`` one-hot (argmax ties kept) and ``foreground`` ``(b, 1, *spatial)`` at the
    sample's resolution. With ``η = ‖Δ‖`` over channels per position, each non-empty region ``i`` gets
    ``mean_fg(η) / mean_i(η)``; the map is ``Σ_i rate_i · mask_i`` clamped to ``[low, high]`` and ``<= cap``,
    then smoothed (:func:`scfg_smooth`).
    """
    eta = delta.norm(dim=1, keepdim=True)
    dims = tuple(range(2, delta.ndim))
    size = regions.sum(dim=dims)
    region_eta = (eta * regions).sum(dim=dims) / (size + 1e-8)
    fore_eta = (eta * foreground).sum(dim=dims) / (foreground.sum(dim=dims) + 1e-8)
    rate = fore_eta * (size > 0).to(delta.dtype) / (region_eta + 1e-8)
    rate_map = (rate.reshape(*rate.shape, *([1] * len(dims))) * regions).sum(dim=1, keepdim=True)
    return scfg_smooth(rate_map.clamp(low, high).clamp_max(cap))
