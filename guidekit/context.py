"""The one meeting point of samplers and strategies: :class:`GuidanceContext`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from .ops.spaces import PredictionSpace

__all__ = ["GuidanceContext", "PredictionSpace", "StrategySpace"]

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
        step_sigma: the step's noise level in the schedule, as a Python float (float64), when the caller
            knows the schedule: the same for every evaluation of a step (predictor, corrector, a churned
            ``sigma_hat``) and in every dtype. Decisions on the noise level (Interval's window) read it, so
            a window means the same steps in float32 and float64 and on every sampler.
        attention: the attention maps the plan's branches asked to record (``Branch.observe``),
            ``{branch name: {layer name: (b, queries, keys) map averaged over heads}}``; ``None`` when none
            did (SAG, S-CFG read them).
        condition: ``(b, ...)`` the condition of the ``cond`` branch as the caller gave it (class labels
            ``(b,)`` for guidekit's models), when it is a tensor with one row per sample; ``None`` when the
            caller has none to show (the diffusers paths, direct calls). Strategies whose weights depend on
            the condition read it (Learned weight); it is never modified.
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
    step_sigma: float | None = None
    attention: Mapping[str, Mapping[str, Tensor]] | None = None
    condition: Tensor | None = None

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
