"""What samplers and denoisers share: the :class:`Denoiser` protocol, :class:`StepInfo`, noise, checks.

A *denoiser* is Karras' ``D(x; sigma) -> x0`` in EDM coordinates (``x = x0 + sigma · eps``), called as
``denoiser(x, sigma, info)`` with ``sigma`` of shape ``(b,)`` and ``info`` telling which step and substep
of which schedule this evaluation belongs to. It may return a plain tensor (``x0``) or a
:class:`Denoised` pair ``(x0, eps)`` when the noise direction the sampler steps along is not the one
implied by ``x0`` (sampler-coupled guidance such as CFG++ re-noises with the unconditional ``eps``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from ..ops.spaces import compute_dtype, eps_from_x0

__all__ = [
    "Callback",
    "Denoised",
    "Denoiser",
    "Generator",
    "SamplerStep",
    "StepInfo",
    "check_sigmas",
    "evaluate",
    "randn_like",
    "report",
]

Generator = torch.Generator | Sequence[torch.Generator] | None
"""One generator for the batch, or one per sample (EDM's ``StackedRandomGenerator``): with a list, sample
``i``'s noise depends only on ``generator[i]``, so a sample does not depend on the batch it is in."""


@dataclass(frozen=True)
class StepInfo:
    """Where an evaluation sits in the run: step ``step`` of ``num_steps`` over ``sigmas``, substep ``substep``.

    ``substep`` is 0 for a step's first evaluation and 1 for a corrector (Heun). ``sigmas`` is the full
    EDM schedule ``(num_steps + 1,)`` as the sampler got it from :func:`check_sigmas` (float64); the step
    goes from ``sigmas[step]`` to :attr:`sigma_next`.
    """

    step: int
    num_steps: int
    sigmas: Tensor
    substep: int = 0

    @property
    def sigma_next(self) -> Tensor:
        """The sigma this step moves to (a 0-d tensor)."""
        return self.sigmas[self.step + 1]


class Denoised(NamedTuple):
    """A denoiser output that also fixes the noise direction: the sampler steps from ``x0`` along ``eps``.

    First-order samplers then compute ``x_next = x0 + sigma_next · eps`` (+ noise); see :func:`evaluate`.
    """

    x0: Tensor
    eps: Tensor


class Denoiser(Protocol):
    """``D(x, sigma, info) -> x0`` in EDM coordinates (or :class:`Denoised`)."""

    def __call__(self, x: Tensor, sigma: Tensor, info: StepInfo) -> Tensor | Denoised: ...


@dataclass(frozen=True)
class SamplerStep:
    """What a sampler reports after each step: the new ``x`` (EDM) and the step's first ``denoised``."""

    step: int
    sigma: float
    sigma_next: float
    x: Tensor
    denoised: Tensor


Callback = Callable[[SamplerStep], None]


def check_sigmas(sigmas: Tensor, x: Tensor) -> Tensor:
    """Validate a schedule and return it on ``x``'s device in float64 (float32 where the device has no
    float64, Apple MPS).

    Expected: 1-D, at least 2 entries, non-negative, strictly decreasing, ending at 0, no NaN; ``inf``
    only as the first entry (flow ``t = 1``). The schedule stays float64 whatever ``x``'s dtype: the
    sampler's scalar coefficients are computed in float64 (a 0-d tensor does not change ``x``'s dtype),
    and :class:`StepInfo` hands the guidance engine the exact schedule values, so a noise-level window
    means the same steps in a float32 and a float64 run.
    """
    if not isinstance(sigmas, Tensor):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ShapeError(f"sigmas: expected a 1-D schedule with at least 2 entries, got shape {tuple(sigmas.shape)}")
    if bool(torch.isnan(sigmas).any()):
        raise ConfigError("sigmas: expected no NaN, got NaN in the schedule")
    if float(sigmas[-1]) != 0.0:
        raise ConfigError(f"sigmas: expected the schedule to end at 0, got {float(sigmas[-1])}")
    if bool((sigmas[:-1] <= sigmas[1:]).any()):
        bad = int(torch.nonzero(sigmas[:-1] <= sigmas[1:])[0])
        raise ConfigError(
            f"sigmas: expected strictly decreasing values, got sigmas[{bad}] = {float(sigmas[bad]):.6g} "
            f"<= sigmas[{bad + 1}] = {float(sigmas[bad + 1]):.6g}"
        )
    if bool(torch.isinf(sigmas[1:]).any()):
        raise ConfigError("sigmas: expected inf only as the first entry, got inf later in the schedule")
    if x.ndim < 2:
        raise ShapeError(f"x: expected (b, c, *spatial), got shape {tuple(x.shape)}")
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    return sigmas.to(device=x.device, dtype=dtype)


def evaluate(denoiser: Denoiser, x: Tensor, sigma: Tensor, info: StepInfo) -> tuple[Tensor, Tensor, Tensor]:
    """Call the denoiser at the scalar ``sigma``; return ``(x, denoised, d)`` with ``d`` the ODE derivative.

    ``d = (x - denoised) / sigma`` (Karras eq. 1 for the VE ODE; ``d = x`` at sigma = inf, where ``x`` holds
    ``x / sigma``). For a :class:`Denoised` output ``(x0, eps)``, ``d = eps`` and ``x`` becomes
    ``x0 + sigma · eps``, so every update below steps from ``x0`` along ``eps`` (CFG++).
    """
    b = x.shape[0]
    sigma_b = sigma.to(compute_dtype(x)).expand(b)
    out = denoiser(x, sigma_b, info)
    denoised = out.x0 if isinstance(out, Denoised) else out
    if not isinstance(denoised, Tensor) or denoised.shape != x.shape:
        got = tuple(denoised.shape) if isinstance(denoised, Tensor) else type(denoised).__name__
        raise ShapeError(f"denoiser output: expected shape {tuple(x.shape)}, got {got}")
    if not isinstance(out, Denoised):
        return x, denoised, eps_from_x0(denoised, x, sigma_b)
    d = out.eps
    if bool(torch.isinf(sigma)):
        return d, denoised, d  # the limit of (x0 + sigma · eps) / sigma
    return (denoised + sigma * d).to(x.dtype), denoised, d


def randn_like(x: Tensor, generator: Generator = None) -> Tensor:
    """Standard normal noise shaped like ``x``; per-sample generators give per-sample streams."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    gens = list(generator)
    if len(gens) != x.shape[0]:
        raise ConfigError(f"generator: expected one generator per sample ({x.shape[0]}), got {len(gens)}")
    return torch.stack(
        [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype).to(x.device) for g in gens]
    )


def report(callback: Callback | None, step: int, sigmas: Tensor, x: Tensor, denoised: Tensor) -> None:
    """Call ``callback`` with the :class:`SamplerStep` of step ``step`` (no-op without a callback)."""
    if callback is not None:
        callback(SamplerStep(step, float(sigmas[step]), float(sigmas[step + 1]), x, denoised))
