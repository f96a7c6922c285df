"""SAG: self-attention guidance (Hong, Jang, Ahn & Kim, ICCV 2023, arXiv 2210.00939)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from ..branch import AttentionMaps, Branch, FollowUp, Plan
from ..context import GuidanceContext, StrategySpace
from ..errors import ConfigError
from ..ops.attention import attended_mask, gaussian_blur
from ..ops.checks import check_number
from ..ops.shapes import append_dims
from ..registry import STRATEGIES
from .base import Combinator, GuidanceStrategy, Predictions
from .cfg import CFG

__all__ = ["SAG"]


@STRATEGIES.register("sag")
@dataclass(frozen=True)
class SAG(Combinator):
    """``ε̃ = inner(ε_c, ε_u) + s · (ε_src − ε(x̃))``: guide away from a forward on a sample whose attended
    regions were blurred.

    ``src`` is the unconditional branch when the inner plan has one (with CFG: the paper's eq. (25) and
    diffusers' ``StableDiffusionSAGPipeline``), else the conditional one. Its forward records the self-attention
    map of one layer (``layers``, an :class:`~guidekit.branch.AttentionMaps` observer); the mask is where the
    attention a token receives, averaged over heads and summed over queries, exceeds ``threshold`` (1, the
    mean), nearest-upsampled to the latent. Then ``x̂0 = x − σ ε_src`` is blurred inside the mask (Gaussian,
    ``kernel_size`` taps of ``blur_sigma``), re-noised with the same ``ε_src`` at the same level,
    ``x̃ = x̂0' + σ ε_src`` (diffusers' ``scheduler.add_noise(x̂0', ε_src, t)``), and a second-stage forward
    (:meth:`follow_up`) on ``x̃`` with ``src``'s condition gives ``ε(x̃)``. 1 NFE more a step (3 with CFG).

    Defaults follow diffusers (``sag_scale = 0.75``, blur σ 1 with 9 taps, threshold 1.0, the UNet's first
    mid-block self-attention: ``layers = ("mid",)``). The paper states the rule with ``ε(x_t)`` for the
    guidance direction and a mean threshold; diffusers and this class use ``ε_src`` on both sides.

    Args:
        inner: the guidance between ``c`` and ``u`` (default ``CFG(7.5)``); its space must be ``eps`` or ``any``.
        scale: ``s``, ``sag_scale`` (0 is ``inner``).
        blur_sigma, kernel_size: the Gaussian blur of ``x̂0`` (pixels of the latent).
        threshold: the mask threshold on the summed attention.
        layers: the self-attention layer whose map is read (selectors; they must resolve to one layer).
    """

    inner: GuidanceStrategy = CFG(7.5)  # noqa: RUF009 - frozen, so a shared default is safe
    scale: float = 0.75
    blur_sigma: float = 1.0
    kernel_size: int = 9
    threshold: float = 1.0
    layers: tuple[str, ...] = ("mid",)

    def __post_init__(self) -> None:
        if not isinstance(self.inner, GuidanceStrategy):
            raise ConfigError(f"inner: expected a GuidanceStrategy, got {type(self.inner).__name__}")
        if self.inner.space not in ("any", "eps"):
            raise ConfigError(
                f"inner: expected a strategy in 'eps' or 'any' space (SAG guides in eps), got "
                f"{type(self.inner).__name__} in {self.inner.space!r} space"
            )
        check_number("scale", self.scale)
        check_number("blur_sigma", self.blur_sigma, low=1e-6)
        check_number("threshold", self.threshold)
        if isinstance(self.kernel_size, bool) or not isinstance(self.kernel_size, int) or self.kernel_size < 1:
            raise ConfigError(f"kernel_size: expected a positive odd integer, got {self.kernel_size!r}")
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size: expected an odd number of taps, got {self.kernel_size}")
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))  # from a JSON spec
        object.__setattr__(self, "_observer", AttentionMaps(self.layers, "self"))

    @property  # type: ignore[override]
    def space(self) -> StrategySpace:  # type: ignore[override]
        return "eps" if self.scale != 0 else self.inner.space  # scale 0 is exactly ``inner``

    def observers(self) -> frozenset[str]:
        return self.inner.observers() | {"self"}

    @property
    def follows_up(self) -> bool:
        return self.scale != 0 or self.inner.follows_up

    def branches(self, ctx: GuidanceContext, state: Any) -> Plan:
        plan = self.inner.branches(ctx, state)
        if self.scale == 0 or not plan:
            return plan
        source = "uncond" if any(b.name == "uncond" for b in plan) else "cond"
        observer: AttentionMaps = self._observer  # type: ignore[attr-defined]
        return tuple(replace(b, observe=observer) if b.name == source else b for b in plan)

    def follow_up(self, preds: Predictions, ctx: GuidanceContext, state: Any) -> FollowUp | None:
        source = "uncond" if "uncond" in preds else "cond"
        maps = (ctx.attention or {}).get(source)
        if self.scale == 0 or not maps or ctx.x is None:
            return None  # the first stage did not observe (an Interval outside its window)
        if len(maps) != 1:
            raise ConfigError(
                f"layers: expected the selectors {list(self.layers)} to pick one self-attention layer for SAG's "
                f"map, got {sorted(maps)}"
            )
        eps, x = preds[source], ctx.x
        sigma = append_dims(ctx.sigma.to(eps.dtype), eps.ndim)
        x0 = x - sigma * eps
        mask = attended_mask(next(iter(maps.values())).to(eps.dtype), tuple(eps.shape[2:]), self.threshold)
        degraded = gaussian_blur(x0, self.blur_sigma, self.kernel_size) * mask + x0 * (1 - mask)
        return FollowUp((Branch("sag", condition=source),), degraded + sigma * eps)

    def combine_branches(self, preds: Predictions, ctx: GuidanceContext, state: Any) -> tuple[Tensor, Any]:
        guided, state = self.inner.combine_branches(preds, ctx, state)
        if self.scale == 0 or "sag" not in preds:
            return guided, state
        source = preds["uncond"] if "uncond" in preds else preds["cond"]
        return guided + self.scale * (source - preds["sag"]), state
