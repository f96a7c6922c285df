"""CogVideoX's dynamic CFG (diffusers ``CogVideoXPipeline(use_dynamic_cfg=True)``; methods.md §9.9)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..context import GuidanceContext
from ..errors import ConfigError
from ..ops.checks import check_choice, check_number
from ..ops.schedules import cogvideox_dynamic_scale
from ..ops.timesteps import trailing_timestep
from ..registry import STRATEGIES
from .base import GuidanceStrategy
from .cfg import CFG
from .scheduled import ScheduledScale

__all__ = ["DynamicCFG"]


@STRATEGIES.register("dynamic-cfg")
@dataclass(frozen=True)
class DynamicCFG(ScheduledScale):
    """``w_i = 1 + w (1 - cos(π p_i^k)) / 2`` with ``w = inner.scale`` and ``k = exponent`` (CogVideoX).

    The released code (diffusers ``pipeline_cogvideox.py`` and THUDM's SAT sampler) uses
    ``p_i = (N - t_i) / N`` with ``t_i`` the *scheduler timestep* (999, 979, ... for 50 trailing steps),
    not the step index, so ``p_i`` is mostly a large negative number and the scale jumps around in
    ``[1, 1 + w]`` from step to step. ``position="timestep"`` (default) reproduces it exactly, with the
    trailing timesteps of a ``num_train_timesteps``-step model (CogVideoX's DDIM configuration).
    ``position="step"`` reads ``p_i = i / N``, the evident intent (a SAT fork's ``fix_timestep_bug``):
    1 for most of the run, rising to about ``1 + w`` over the last fifth.

    Args:
        inner: strategy run at each step's scale (default ``CFG(6.0)``, CogVideoX's default).
        exponent: ``k`` (5 in CogVideoX); an integer for ``position="timestep"`` (negative base).
        position: ``"timestep"`` (as released) or ``"step"``.
        num_train_timesteps: the model's training timesteps, for ``position="timestep"``.
    """

    inner: GuidanceStrategy = CFG(6.0)  # noqa: RUF009 - frozen, so a shared default is safe
    exponent: float = 5.0
    position: Literal["timestep", "step"] = "timestep"
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        self._check_inner()
        check_choice("position", self.position, ("timestep", "step"))
        exponent = check_number("exponent", self.exponent, low=0.0)
        if self.position == "timestep" and not exponent.is_integer():
            raise ConfigError(f"exponent: expected an integer for position='timestep' (p < 0), got {self.exponent!r}")
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int):
            raise ConfigError(f"num_train_timesteps: expected a positive integer, got {self.num_train_timesteps!r}")
        if self.num_train_timesteps < 1:
            raise ConfigError(f"num_train_timesteps: expected a positive integer, got {self.num_train_timesteps!r}")

    def position_at(self, step: int, num_steps: int) -> float:
        """``p_i`` of step ``step`` of ``num_steps``."""
        if self.position == "step":
            return step / num_steps
        return (num_steps - trailing_timestep(step, num_steps, self.num_train_timesteps)) / num_steps

    def scale_at(self, ctx: GuidanceContext) -> Tensor:
        p = self.position_at(ctx.step, max(ctx.num_steps, 1))
        w = cogvideox_dynamic_scale(self.mean_scale, p, self.exponent)
        return torch.full((ctx.sigma.shape[0],), w, dtype=torch.float64)
