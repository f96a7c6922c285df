"""Adapters: a native model ``model(x, t, cond) -> prediction`` seen as an EDM denoiser (k-diffusion ``external.py``).

The native call convention:

* ``x``: the model's own input, in its own coordinates and layout (VP ``x_t = alpha x0 + sigma_vp eps``,
  flow ``x_t = (1 - t) x0 + t eps``, or EDM ``x``), e.g. ``(b, c, h, w)`` or ``(b, f, c, h, w)``;
* ``t``: the model's own time, a ``(b,)`` float tensor: VP training timestep on ``0 .. T-1`` (fractional
  between grid points), flow time ``t · time_scale`` (``time_scale = 1000`` for diffusers' SD3/Flux
  transformers), or EDM sigma;
* ``cond``: whatever the model takes, passed through (a tensor, or a nested dict/tuple of tensors with the
  batch first; ``None`` for an unconditional model).

A diffusers UNet is ``VPModel(lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample, acp)``.
Adapters convert layouts at the edge (``layout``), so samplers and strategies see ``(b, c, *spatial)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ..context import PredictionSpace
from ..errors import ConfigError, ShapeError
from ..ops.checks import all_finite, check_finite
from ..ops.shapes import check_layout, from_canonical, parse_layout, to_canonical
from ..ops.spaces import compute_dtype, edm_x_from, flow_t_from_sigma, flow_x, to_x0, vp_x
from ..ops.timesteps import betas_linear, timestep_from_log_sigmas
from ..ops.timesteps import log_sigmas as _log_sigmas
from .base import StepInfo

__all__ = ["EDMModel", "FlowModel", "ModelAdapter", "NativeModel", "VPModel", "adapt"]

NativeModel = Callable[[Tensor, Tensor, Any], Tensor]
Coords = Literal["edm", "vp", "flow"]


class ModelAdapter(ABC):
    """A native model wrapped for the samplers: EDM ``(x, sigma)`` in, native prediction or ``x0`` out.

    Attributes:
        model: the native callable ``model(x, t, cond)``.
        prediction: the space of the model's output (``eps``, ``v``, ``flow`` or ``x0``).
        layout: the model's tensor layout, e.g. ``"b f c h w"``; samplers see ``(b, c, *spatial)``.
    """

    coords: ClassVar[Coords]
    predictions: ClassVar[tuple[PredictionSpace, ...]]

    def __init__(self, model: NativeModel, prediction: PredictionSpace, layout: str = "b c h w") -> None:
        if not callable(model):
            raise ConfigError(f"model: expected a callable model(x, t, cond), got {type(model).__name__}")
        if prediction not in self.predictions:
            raise ConfigError(
                f"prediction: expected one of {self.predictions} for {type(self).__name__}, got {prediction!r}"
            )
        parse_layout(layout)
        self.model = model
        self.prediction: PredictionSpace = prediction
        self.layout = layout

    # -- the model's own time and coordinates ------------------------------------------------------
    @abstractmethod
    def model_time(self, sigma: Tensor) -> Tensor:
        """The native ``t`` for per-sample EDM ``sigma`` ``(b,)``."""

    def to_native_x(self, x: Tensor, sigma: Tensor) -> Tensor:
        """EDM ``x`` -> the model's coordinates (layout unchanged)."""
        return x

    def from_native_x(self, x_native: Tensor, sigma: Tensor) -> Tensor:
        """The model's coordinates -> EDM ``x`` (inverse of :meth:`to_native_x`)."""
        return edm_x_from(x_native, sigma, self.coords)

    # -- evaluation -------------------------------------------------------------------------------
    def predict(self, x: Tensor, sigma: Tensor, cond: Any = None, *, allow_nonfinite: bool = False) -> Tensor:
        """One forward pass: the native prediction at EDM ``(x, sigma)``, in ``(b, c, *spatial)``.

        The output is cast to the input's dtype, so a model that upcasts (or runs under autocast) does not
        change the sample's dtype; a non-floating output is refused.
        """
        x_in = from_canonical(self.to_native_x(x, sigma), self.layout)
        t = self.model_time(sigma).to(device=x.device, dtype=compute_dtype(x))
        out = self.model(x_in, t, cond)
        if not isinstance(out, Tensor) or out.shape != x_in.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ShapeError(
                f"model output: expected a tensor shaped like the model input {tuple(x_in.shape)} "
                f"(layout {self.layout!r}), got {got}"
            )
        if not out.is_floating_point():
            raise ShapeError(f"model output: expected a floating-point tensor, got {out.dtype}")
        if out.dtype != x_in.dtype:  # an upcasting model (or autocast) does not change the sample's dtype
            out = out.to(x_in.dtype)
        if not allow_nonfinite and out.device.type != "meta" and not all_finite(out):  # one reduction
            check_finite(out, f"model output at sigma in [{float(sigma.min()):.4g}, {float(sigma.max()):.4g}]")
        return to_canonical(out, self.layout)

    def to_x0(self, pred: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        """The ``x0`` implied by a native prediction at EDM ``(x, sigma)``."""
        return to_x0(pred, self.prediction, x, sigma)

    def __call__(self, x: Tensor, sigma: Tensor, info: StepInfo | None = None, *, cond: Any = None) -> Tensor:
        """The plain (unguided) denoiser ``D(x, sigma) -> x0`` with condition ``cond``."""
        return self.to_x0(self.predict(x, sigma, cond), x, sigma)

    # -- the edges of a run -----------------------------------------------------------------------
    def initial_x(self, x_native: Tensor, sigma: Tensor | float) -> Tensor:
        """A starting sample in the model's layout and coordinates -> canonical EDM ``x`` at ``sigma``.

        ``x_T ~ N(0, I)`` is the usual start for VP and flow models (diffusers' ``init_noise_sigma = 1``).
        """
        check_layout(x_native, self.layout, "x_T")
        x = to_canonical(x_native, self.layout)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
        return self.from_native_x(x, sigma)

    def final_x(self, x: Tensor) -> Tensor:
        """A clean canonical sample (sigma = 0, where every coordinate system agrees) -> the model's layout."""
        return from_canonical(x, self.layout)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prediction={self.prediction!r}, layout={self.layout!r})"


class VPModel(ModelAdapter):
    """A discrete-time VP model (DDPM, SD, SDXL, ModelScope, CogVideoX) predicting ``eps``, ``v`` or ``x0``.

    ``t`` is the training timestep of ``sigma`` on the ``alphas_cumprod`` grid (fractional between grid
    points, :func:`~guidekit.ops.timesteps.vp_timestep_from_sigma`); the input is ``alpha · x``.

    Args:
        model: ``model(x_vp, t, cond) -> prediction``.
        alphas_cumprod: the training ``alphas_cumprod`` ``(T,)``; default DDPM's linear betas, ``T = 1000``.
        prediction: ``"eps"`` (SD1.x, SDXL, ModelScope), ``"v"`` (SD2-768, CogVideoX) or ``"x0"``.
        layout: the model's layout.
    """

    coords = "vp"
    predictions = ("eps", "v", "x0")

    def __init__(
        self,
        model: NativeModel,
        alphas_cumprod: Tensor | None = None,
        prediction: PredictionSpace = "eps",
        layout: str = "b c h w",
    ) -> None:
        super().__init__(model, prediction, layout)
        if alphas_cumprod is None:
            alphas_cumprod = torch.cumprod(1 - betas_linear(), 0)
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        self._log_sigmas = _log_sigmas(self.alphas_cumprod)  # validates; cached for model_time

    @property
    def sigma_min(self) -> float:
        """The smallest EDM sigma of the training grid (timestep 0)."""
        return float(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]).sqrt())

    @property
    def sigma_max(self) -> float:
        """The largest EDM sigma of the training grid (timestep ``T - 1``; ``inf`` at zero terminal SNR)."""
        return float(((1 - self.alphas_cumprod[-1]) / self.alphas_cumprod[-1]).sqrt())

    def model_time(self, sigma: Tensor) -> Tensor:
        return timestep_from_log_sigmas(sigma, self._log_sigmas)

    def to_native_x(self, x: Tensor, sigma: Tensor) -> Tensor:
        return vp_x(x, sigma)


class FlowModel(ModelAdapter):
    """A rectified-flow model (SD3, SD3.5, Flux, Wan) predicting the velocity ``v = eps - x0`` (or ``x0``).

    Input ``x_t = x / (1 + sigma)`` at ``t = sigma / (1 + sigma)``; the model gets ``t · time_scale``.

    Args:
        model: ``model(x_t, t, cond) -> velocity``.
        prediction: ``"flow"`` (velocity) or ``"x0"``.
        time_scale: multiply ``t`` by this before the call (1000 for diffusers' flow transformers, whose
            ``timestep`` argument is ``1000 · t``).
        layout: the model's layout.
    """

    coords = "flow"
    predictions = ("flow", "x0")

    def __init__(
        self, model: NativeModel, prediction: PredictionSpace = "flow", time_scale: float = 1.0, layout: str = "b c h w"
    ) -> None:
        super().__init__(model, prediction, layout)
        if not (isinstance(time_scale, int | float) and time_scale > 0):
            raise ConfigError(f"time_scale: expected a positive number, got {time_scale!r}")
        self.time_scale = float(time_scale)

    def model_time(self, sigma: Tensor) -> Tensor:
        return flow_t_from_sigma(sigma.to(torch.float64)) * self.time_scale

    def to_native_x(self, x: Tensor, sigma: Tensor) -> Tensor:
        return flow_x(x, sigma)


class EDMModel(ModelAdapter):
    """A model already in EDM form, ``model(x, sigma, cond) -> x0`` (or ``eps``), e.g. a k-diffusion denoiser."""

    coords = "edm"
    predictions = ("x0", "eps")

    def __init__(self, model: NativeModel, prediction: PredictionSpace = "x0", layout: str = "b c h w") -> None:
        super().__init__(model, prediction, layout)

    def model_time(self, sigma: Tensor) -> Tensor:
        if bool(torch.isinf(sigma).any()):
            raise ConfigError("sigma: expected finite values for an EDM model, got inf (start the schedule lower)")
        return sigma


def adapt(
    model: NativeModel | ModelAdapter,
    prediction: str = "eps",
    *,
    alphas_cumprod: Tensor | None = None,
    time_scale: float = 1.0,
    layout: str = "b c h w",
) -> ModelAdapter:
    """Wrap a native model by its prediction type: ``eps``/``v``/``x0`` -> :class:`VPModel`, ``flow`` ->
    :class:`FlowModel`, ``edm`` -> :class:`EDMModel`. An adapter is returned unchanged."""
    if isinstance(model, ModelAdapter):
        return model
    if prediction in ("eps", "v", "x0"):
        return VPModel(model, alphas_cumprod, prediction, layout)  # type: ignore[arg-type]
    if alphas_cumprod is not None:
        raise ConfigError(
            f"alphas_cumprod: only used by VP models (prediction eps, v, x0), got prediction={prediction!r}"
        )
    if prediction == "flow":
        return FlowModel(model, "flow", time_scale, layout)
    if prediction == "edm":
        return EDMModel(model, "x0", layout)
    raise ConfigError(f"prediction: expected one of 'eps', 'v', 'x0', 'flow', 'edm', got {prediction!r}")
