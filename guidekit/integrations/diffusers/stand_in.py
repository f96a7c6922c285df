"""The stand-in scheduler that lets a guidekit sampler run inside a pipeline's single step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from torch import Tensor

from ...context import PredictionSpace
from ...errors import ConfigError, GuidekitError
from ...ops.spaces import flow_t_from_sigma
from ...samplers.adapters import FlowModel, ModelAdapter, VPModel
from .families import latent_coords, noise_schedule

__all__ = ["SamplerScheduler"]


class _ScheduleTime:
    """Adapter mixin: at a point of the pipeline's schedule the model gets the scheduler's own timestep."""

    points: Tensor
    timesteps: Tensor

    def model_time(self, sigma: Tensor) -> Tensor:
        match = self.points.to(sigma.device, sigma.dtype)[None, :] == sigma[:, None]
        found = match.any(dim=1)
        exact = self.timesteps.to(sigma.device)[match.to(torch.uint8).argmax(dim=1)]
        if bool(found.all()):  # the usual case: every evaluation sits on the schedule
            return exact
        return torch.where(found, exact, super().model_time(sigma).to(exact))  # type: ignore[misc]


class _PipelineVPModel(_ScheduleTime, VPModel):
    pass


class _PipelineFlowModel(_ScheduleTime, FlowModel):
    pass


class SamplerScheduler:
    """Stands in for the pipeline's scheduler while a guidekit sampler runs inside the pipeline's single step.

    ``set_timesteps`` builds the real schedule on a copy of the pipeline's scheduler. Any ``timesteps``,
    ``sigmas`` or ``mu`` the pipeline passes go to that copy. The stand-in then offers one timestep;
    ``step`` returns the model output, which is the sampler's final sample.
    """

    order = 1

    def __init__(self, original: Any) -> None:
        self.config = original.config
        self._original = original
        self.coords = latent_coords(original)
        self.init_noise_sigma = 1.0
        self.timesteps: Tensor | None = None
        self.sigmas: Tensor | None = None
        self.sigmas_edm = torch.zeros(0, dtype=torch.float64)
        self.done = False
        self._real: Any = None
        self._points = torch.zeros(0, dtype=torch.float64)
        self._point_timesteps = torch.zeros(0, dtype=torch.float64)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Any = None,
        timesteps: Any = None,
        sigmas: Any = None,
        **kwargs: Any,
    ) -> None:
        real = type(self._original).from_config(self._original.config)
        custom = {k: v for k, v in (("timesteps", timesteps), ("sigmas", sigmas)) if v is not None}
        if custom:
            real.set_timesteps(device=device, **custom, **kwargs)
        else:
            real.set_timesteps(num_inference_steps, device=device, **kwargs)
        schedule, steps = noise_schedule(real), real.timesteps.double().cpu()
        n = len(steps)
        # multi-evaluation schedulers (Heun) repeat levels: a sampler takes each level once, ending at 0
        keep = torch.ones(n, dtype=torch.bool)
        keep[1:] = schedule[1:n] != schedule[: n - 1]
        self._points, self._point_timesteps = schedule[:n][keep], steps[keep]
        self.sigmas_edm = torch.cat([self._points, torch.zeros(1, dtype=torch.float64)])
        self.init_noise_sigma = float(getattr(real, "init_noise_sigma", 1.0))
        self.timesteps = real.timesteps[:1]
        first = flow_t_from_sigma(self._points[:1]) if self.coords == "flow" else self._points[:1]
        self.sigmas = torch.cat([first, torch.zeros(1, dtype=torch.float64)]).float()  # Wan reads sigmas[0]
        self._real = real

    def adapter(self, model: Callable[..., Tensor], space: PredictionSpace, layout: str) -> ModelAdapter:
        """``model`` as a guidekit adapter on this schedule (exact scheduler timesteps at schedule points)."""
        if self.coords == "flow":
            num_train = float(self._real.config.get("num_train_timesteps", 1000))
            adapter: Any = _PipelineFlowModel(model, space, time_scale=num_train, layout=layout)
        else:
            adapter = _PipelineVPModel(model, self._real.alphas_cumprod, space, layout)
        adapter.points, adapter.timesteps = self._points, self._point_timesteps
        return adapter

    def set_begin_index(self, begin_index: int = 0) -> None:
        if begin_index != 0:
            raise ConfigError(f"begin_index: expected 0 with a guidekit sampler (no img2img start), got {begin_index}")

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        return sample

    def step(
        self, model_output: Tensor, timestep: Any, sample: Tensor, *args: Any, return_dict: bool = True, **kw: Any
    ):
        if not self.done:
            raise GuidekitError("sampler: the pipeline stepped its scheduler before the guidekit sampler ran")
        return SchedulerOutput(prev_sample=model_output) if return_dict else (model_output,)

    def __len__(self) -> int:
        return int(self.config.get("num_train_timesteps", 1000))
