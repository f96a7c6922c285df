"""The one meeting point of samplers and strategies: :class:`GuidanceContext`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

__all__ = ["GuidanceContext", "PredictionSpace", "StrategySpace", "x0_delta_scale"]

PredictionSpace = Literal["x0", "eps", "v", "flow"]
"""What a prediction tensor means.

* ``x0``: the denoised sample (Karras' ``D(x; sigma)``).
* ``eps``: the noise (VP and EDM/VE share it).
* ``v``: VP v-prediction ``alpha * eps - sigma_vp * x0`` (needs ``alpha^2 + sigma_vp^2 = 1``).
* ``flow``: rectified-flow velocity ``eps - x0`` (diffusers' ``FlowMatchEulerDiscreteScheduler``).
"""

StrategySpace = Literal["any", "native", "x0", "eps", "v", "flow"]
"""Where a strategy's math is defined. ``any``: linear in the predictions, so every space gives the same
guided sample (the linearity lemma, methods.md §2); ``native``: the model's own output (TCFG, CFG-Zero*)."""


@dataclass(frozen=True)
class GuidanceContext:
    """Everything a strategy may read about the current model evaluation.

    Attributes:
        sigma: ``(b,)`` noise level in the EDM/VE sense (``sigma_edm = sigma_vp / alpha``; flow time
            ``t`` maps to ``t / (1 - t)``).
        step: index of the sampler step, ``0 .. num_steps - 1``.
        num_steps: number of sampler steps of the run.
        substep: 0 for a step's first model evaluation, 1 (2, ...) for corrector evaluations (Heun).
            Stateful strategies advance their state only on ``substep == 0``.
        sigmas: the full EDM sigma schedule ``(num_steps + 1,)`` ending at 0, when the loop knows it.
        sigma_next: ``(b,)`` EDM sigma the sampler steps to, when known (CFG++ needs it).
        space: the space ``pred_cond`` / ``pred_uncond`` are expressed in; ``None`` when the caller cannot
            tell (a diffusers scheduler without ``prediction_type``): then only space-free strategies run.
        x: the current noisy sample in the coordinates of ``space`` (VP ``x_t``, flow ``x_t`` or EDM ``x``),
            or ``None`` when the caller does not provide it.
        allow_nonfinite: if False (default) strategies raise :class:`~guidekit.errors.NonFiniteError` on
            NaN/Inf in their output instead of returning it.
    """

    sigma: Tensor
    step: int = 0
    num_steps: int = 1
    substep: int = 0
    sigmas: Tensor | None = None
    sigma_next: Tensor | None = None
    space: PredictionSpace | None = "eps"
    x: Tensor | None = None
    allow_nonfinite: bool = False

    @classmethod
    def default(cls, like: Tensor, sigma: float = 1.0, **kwargs: object) -> GuidanceContext:
        """A context for direct calls: every sample at ``sigma`` (EDM), step 0 of 1."""
        sig = torch.full((like.shape[0],), float(sigma), device=like.device, dtype=torch.float32)
        return cls(sigma=sig, **kwargs)  # type: ignore[arg-type]

    @property
    def progress(self) -> float:
        """Fraction of the run already done, ``step / num_steps`` in ``[0, 1)``."""
        return self.step / max(self.num_steps, 1)

    def replace(self, **changes: object) -> GuidanceContext:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return replace(self, **changes)  # type: ignore[arg-type]


def x0_delta_scale(space: PredictionSpace, sigma: Tensor) -> Tensor:
    """Per-sample ``k`` with ``Δx0 = k · Δpred`` at a fixed ``x_t`` (methods.md §2).

    Every conversion between spaces is affine with coefficients shared by the conditional and the
    unconditional prediction, so a *difference* of predictions converts by one scalar per sample:
    eps ``-sigma``; VP v ``-sigma / sqrt(1 + sigma^2)``; flow ``-t = -sigma / (1 + sigma)``; x0 ``1``.
    """
    sigma = sigma.to(torch.float32)
    if space == "x0":
        return torch.ones_like(sigma)
    if space == "eps":
        return -sigma
    # written in 1/sigma so that sigma = inf (flow t = 1, zero terminal SNR) gives the limit -1, not NaN
    if space == "v":
        return -torch.rsqrt(1.0 + torch.reciprocal(sigma * sigma))
    if space == "flow":
        return -torch.reciprocal(1.0 + torch.reciprocal(sigma))
    raise ValueError(f"space: expected one of 'x0', 'eps', 'v', 'flow', got {space!r}")
