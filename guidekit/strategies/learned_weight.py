"""Learned guidance weights: CFG with ``ω(c, s, t)`` from a small network (Learn to Guide Your Diffusion Model)."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..context import GuidanceContext
from ..errors import ConfigError, ShapeError
from ..ops.checks import check_number
from ..ops.guidance import cfg
from ..ops.shapes import per_sample
from ..ops.spaces import compute_dtype
from ..registry import STRATEGIES
from .base import GuidanceStrategy

__all__ = ["GuidanceWeightNet", "LearnedWeight", "load_guidance_weights", "save_guidance_weights"]

KIND = "guidekit.learned-weight"
"""The ``kind`` of the JSON record beside a weights file."""

SHIPPED = "digits_learned_weight"
"""The shipped ω of the digits model (``guidekit/zoo/checkpoints/``)."""


class GuidanceWeightNet(nn.Module):
    """``ω(c, s, t)``: a condition embedding and Fourier features of ``log σ_t``, ``log σ_s`` into a small MLP.

    Times are EDM sigmas (``σ_t`` the noise level denoised from, ``σ_s`` the one stepped to), so one net
    serves every sampler and prediction space. Each is clamped to ``[sigma_floor, sigma_ceil]`` (``σ_s = 0``
    on the last step, ``σ_t = inf`` at flow ``t = 1``) and enters as ``u = log σ / 4`` with
    ``sin``/``cos`` of ``2^k u`` for ``k < frequencies``. Row ``num_classes`` of the embedding is the
    *unknown* condition (trained on a share of the batch, so ``ω(∅, s, t)`` is a condition-free weight);
    ``num_classes = 0`` makes the net a function of ``(s, t)`` alone. The last layer starts at zero with
    bias ``omega_init``, so an untrained net is CFG at scale ``1 + omega_init``.

    ``slots`` makes the condition a *prompt* of tokens ``(b, len(slots))`` instead of class labels ``(b,)``:
    slot ``i`` takes ``slots[i]`` tokens, its last one the slot's null token (the glyphs model:
    ``slots = (11, 6)``, ``[digit, texture]``). Each prompt is one embedding row, its tokens read as the
    digits of a mixed-radix number (``row = digit · 6 + texture`` for the glyphs), so a prompt with an
    unspecified slot has its own ω; the all-null prompt is the last row, the unknown condition.
    ``num_classes`` must then be ``prod(slots) - 1``.
    """

    def __init__(
        self,
        num_classes: int,
        emb_dim: int = 16,
        hidden: int = 64,
        frequencies: int = 3,
        omega_init: float = 0.0,
        sigma_floor: float = 1e-3,
        sigma_ceil: float = 1e3,
        slots: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ConfigError(f"num_classes: expected an integer >= 0, got {num_classes!r}")
        if slots is not None:
            slots = tuple(slots)
            if not slots or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in slots):
                raise ConfigError(f"slots: expected token counts >= 2 per prompt slot, got {slots!r}")
            if num_classes != math.prod(slots) - 1:
                raise ConfigError(
                    f"num_classes: expected prod(slots) - 1 = {math.prod(slots) - 1} for slots {slots}, "
                    f"got {num_classes}"
                )
        if not 0 < sigma_floor < sigma_ceil:
            raise ConfigError(f"sigma_floor, sigma_ceil: expected 0 < floor < ceil, got {sigma_floor}, {sigma_ceil}")
        self.config = {
            "num_classes": num_classes,
            "emb_dim": emb_dim,
            "hidden": hidden,
            "frequencies": frequencies,
            "omega_init": float(omega_init),
            "sigma_floor": float(sigma_floor),
            "sigma_ceil": float(sigma_ceil),
        }
        if slots is not None:  # only prompt nets name it: a label net's record is what it always was
            self.config["slots"] = list(slots)
        self.num_classes = num_classes
        self.slots = slots
        self.embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        width = (emb_dim if num_classes else 0) + 2 * (1 + 2 * frequencies) + 1
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, float(omega_init))
        self.register_buffer("scales", 2.0 ** torch.arange(frequencies, dtype=torch.float32), persistent=False)
        self._memo: dict[tuple[float, float, str, torch.dtype], Tensor] = {}

    def _time(self, sigma: Tensor) -> Tensor:
        cfg_ = self.config
        dtype = self.out.weight.dtype
        u = sigma.to(dtype).clamp(cfg_["sigma_floor"], cfg_["sigma_ceil"]).log()[:, None] / 4
        angles = u * self.scales.to(u.device, u.dtype)
        return torch.cat([u, angles.sin(), angles.cos()], 1)

    def index(self, condition: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """Embedding rows for ``condition``: class ``k`` -> ``k``; ``None`` or an unconditional label
        (``num_classes``, guidekit's digits ``NULL_CLASS``, or ``-1``, the oracle's) -> ``num_classes``; with
        ``slots``, prompts ``(batch, len(slots))`` -> their mixed-radix row (the all-null prompt -> ``num_classes``)."""
        k = self.num_classes
        if condition is None or k == 0:  # a condition-free net ignores the condition
            return torch.full((batch,), k, dtype=torch.long, device=device)
        if self.slots is not None:
            return self._prompt_rows(condition, batch, device)
        if condition.shape != (batch,) or condition.is_floating_point() or condition.is_complex():
            raise ShapeError(
                f"ctx.condition: expected integer class labels of shape ({batch},), got {condition.dtype} "
                f"{tuple(condition.shape)}"
            )
        labels = condition.to(device=device, dtype=torch.long)
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < -1 or hi > k:
            bad = labels[(labels < -1) | (labels > k)]
            raise ConfigError(
                f"ctx.condition: expected class labels in 0..{k - 1} (or {k} / -1 for none), got {int(bad[0])}"
            )
        return labels.remainder(k + 1) if lo < 0 else labels  # -1 -> k

    def _prompt_rows(self, condition: Tensor, batch: int, device: torch.device) -> Tensor:
        """Prompts ``(batch, len(slots))`` -> rows: the tokens as the digits of a mixed-radix number."""
        slots = self.slots
        assert slots is not None
        if condition.shape != (batch, len(slots)) or condition.is_floating_point() or condition.is_complex():
            raise ShapeError(
                f"ctx.condition: expected integer prompt tokens of shape ({batch}, {len(slots)}), got "
                f"{condition.dtype} {tuple(condition.shape)}"
            )
        tokens = condition.to(device=device, dtype=torch.long)
        rows = torch.zeros(batch, dtype=torch.long, device=device)
        for i, n in enumerate(slots):
            column = tokens[:, i]
            if bool(((column < 0) | (column >= n)).any()):
                bad = column[(column < 0) | (column >= n)]
                raise ConfigError(
                    f"ctx.condition: expected tokens in 0..{n - 1} in prompt slot {i} ({n - 1} = null), "
                    f"got {int(bad[0])}"
                )
            rows = rows * n + column
        return rows

    def forward(self, condition: Tensor | None, sigma_s: Tensor, sigma_t: Tensor) -> Tensor:
        """``ω`` per sample ``(b,)`` for labels ``condition`` ``(b,)`` (prompts ``(b, len(slots))``; or
        ``None``) and EDM sigmas, in the
        parameters' dtype (float32 while training; float64 once loaded, so a sample's ω does not depend on the
        batch it is in: float32 matrix products round differently for different batch sizes)."""
        return self.at(self.index(condition, sigma_t.shape[0], sigma_t.device), sigma_s, sigma_t)

    def at(self, rows: Tensor, sigma_s: Tensor, sigma_t: Tensor) -> Tensor:
        """``ω`` for embedding rows ``rows`` (from :meth:`index`), ``(b,)``."""
        last = (sigma_s <= 0).to(self.out.weight.dtype)[:, None]
        feats = [self._time(sigma_t), self._time(sigma_s), last]
        if self.embed is not None:
            feats.insert(0, self.embed(rows))
        return self.out(self.mlp(torch.cat(feats, 1))).squeeze(1)

    def per_sample(self, condition: Tensor | None, sigma_s: Tensor, sigma_t: Tensor) -> Tensor:
        """:meth:`forward`, with the net run once per embedding row when the batch shares its sigmas (a
        sampler's batch does): ``num_classes + 1`` rows whatever the batch size, then gathered. The rows of a
        ``(t, s)`` pair are remembered while the net is frozen (a sampler asks for the same pairs every run)."""
        b = sigma_t.shape[0]
        rows = self.index(condition, b, sigma_t.device)
        if b == 1 or not bool(((sigma_t == sigma_t[0]) & (sigma_s == sigma_s[0])).all()):
            return self.at(rows, sigma_s, sigma_t)
        key = (float(sigma_t[0]), float(sigma_s[0]), str(sigma_t.device), self.out.weight.dtype)
        table = None if self.training else self._memo.get(key)
        if table is None:
            every = torch.arange(self.num_classes + 1, device=sigma_t.device)
            k = every.shape[0]
            table = self.at(every, sigma_s[:1].expand(k), sigma_t[:1].expand(k))
            if not self.training and not self.out.weight.requires_grad:
                if len(self._memo) >= 4096:
                    self._memo.clear()
                self._memo[key] = table
        return table[rows]


def _resolve(weights: str) -> Path:
    """A shipped checkpoint name (``guidekit/zoo/checkpoints/<name>.safetensors``) or a path to one."""
    path = Path(weights)
    if path.suffix != ".safetensors" and len(path.parts) == 1:
        path = Path(__file__).resolve().parents[1] / "zoo" / "checkpoints" / f"{weights}.safetensors"
    return path


def save_guidance_weights(net: GuidanceWeightNet, path: str | Path, record: dict[str, Any] | None = None) -> Path:
    """Write ``net`` as ``<path>.safetensors`` and its JSON description ``<path>.json`` (architecture and
    ``record``: training command, seed, figures); return the weights path."""
    from safetensors.torch import save_file

    path = Path(path)
    weights = path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(weights))
    meta = {"kind": KIND, "architecture": net.config, **(record or {})}
    weights.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return weights


_CACHE: dict[tuple[str, int, int], GuidanceWeightNet] = {}
_LOCK = threading.Lock()


def load_guidance_weights(weights: str | Path) -> GuidanceWeightNet:
    """The ω net of a weights file (``.safetensors`` + ``.json``), or of a shipped name; cached per file."""
    from safetensors.torch import load_file

    path = _resolve(str(weights))
    meta_path = path.with_suffix(".json")
    for p in (path, meta_path):
        if not p.is_file():
            raise ConfigError(
                f"weights: expected a shipped name or a .safetensors path with a .json beside it; {p} does not "
                "exist (train one: `guidekit train-guidance`)"
            )
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") != KIND:
        raise ConfigError(f"weights: expected a JSON record of kind {KIND!r} in {meta_path}, got {meta.get('kind')!r}")
    net = GuidanceWeightNet(**meta["architecture"])
    net.load_state_dict(load_file(str(path)))
    net.double().eval().requires_grad_(False)
    with _LOCK:
        _CACHE[key] = net
    return net


@STRATEGIES.register("learned-weight")
@dataclass(frozen=True)
class LearnedWeight(GuidanceStrategy):
    """CFG with a learned weight ``x̂ = x̂_c + ω(c, s, t) (x̂_c - x̂_∅)`` (Galashov et al. 2025, arXiv 2510.00815).

    The paper's x0 form with ``ω = w - 1`` in guidekit's convention: the guided prediction is
    ``u + (1 + ω)(c - u)``, linear in the predictions, so every prediction space gives the same sample
    (methods.md §2). ``ω`` comes from a :class:`GuidanceWeightNet` of the condition (``ctx.condition``, the
    ``cond`` branch's class labels, or its prompt tokens for a net with ``slots``), the noise level
    denoised from (``t``: ``ctx.sigma``) and the one
    stepped to (``s``: ``ctx.sigma_next``, the sampler's next sigma; ``0`` when the caller does not know
    it). Without a condition (the diffusers paths, direct calls) the net's *unknown condition* row gives
    ``ω(∅, s, t)``. Train one with ``guidekit train-guidance`` (:mod:`guidekit.zoo.train_guidance`).

    Args:
        weights: a shipped name (default ``"digits_learned_weight"``, the digits model's ω) or a path to a
            ``.safetensors`` file with its ``.json`` description beside it.
        omega_scale: multiplies the learned ω (guidekit's knob, not the paper's): 1 is the weight as
            trained; larger values guide harder along the learned ``(c, s, t)`` profile.
    """

    weights: str = SHIPPED
    omega_scale: float = 1.0
    net: GuidanceWeightNet = field(init=False, repr=False, compare=False)
    """The ω network, loaded when the strategy is made (a missing or foreign file fails here, not mid-run)."""

    def __post_init__(self) -> None:
        if not isinstance(self.weights, str) or not self.weights:
            raise ConfigError(f"weights: expected a shipped name or a file path, got {self.weights!r}")
        check_number("omega_scale", self.omega_scale)
        object.__setattr__(self, "net", load_guidance_weights(self.weights))

    def reads_condition(self) -> bool:
        return self.net.num_classes > 0

    def omega(self, ctx: GuidanceContext) -> Tensor:
        """``ω`` per sample ``(b,)`` float64 at this evaluation."""
        sigma = ctx.sigma
        nxt = ctx.sigma_next if ctx.sigma_next is not None else torch.zeros_like(sigma)
        with torch.no_grad():
            net = self.net
            if sigma.device.type != "cpu":
                net = _on_device(net, sigma.device)
            omega = net.per_sample(ctx.condition, nxt.to(sigma.device), sigma).to(torch.float64)
        return omega if self.omega_scale == 1.0 else omega * self.omega_scale

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        scale = per_sample(1.0 + self.omega(ctx), pred_cond, dtype=compute_dtype(pred_cond))
        return cfg(pred_cond, pred_uncond, scale)

    def scale_map(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        return per_sample(1.0 + self.omega(ctx), pred_cond)


_DEVICE_CACHE: dict[tuple[int, str], GuidanceWeightNet] = {}


def _on_device(net: GuidanceWeightNet, device: torch.device) -> GuidanceWeightNet:
    key = (id(net), str(device))
    with _LOCK:
        if key not in _DEVICE_CACHE:
            import copy

            _DEVICE_CACHE[key] = copy.deepcopy(net).to(device)
        return _DEVICE_CACHE[key]


def constant_weight(omega: float, path: str | Path) -> Path:
    """Write an ω net that is ``omega`` everywhere (CFG at scale ``1 + omega``) to ``path``; for tests."""
    if not math.isfinite(omega):
        raise ConfigError(f"omega: expected a finite number, got {omega!r}")
    return save_guidance_weights(GuidanceWeightNet(0, omega_init=omega), path, {"note": "constant"})
