"""One intercepted denoiser call: its arguments, its cond/uncond halves, and the call as a native model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import Tensor

__all__ = ["Call", "pack", "zip_cat"]


def _is_batch(obj: Any, batch: int) -> bool:
    return isinstance(obj, Tensor) and obj.ndim > 0 and obj.shape[0] == batch


def _map_batch(obj: Any, fn: Callable[[Tensor], Any], batch: int) -> Any:
    """Apply ``fn`` to every tensor in ``obj`` (dicts are searched too) whose leading dim is ``batch``."""
    if _is_batch(obj, batch):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_batch(v, fn, batch) for k, v in obj.items()}
    return obj


def zip_cat(first: Any, second: Any, batch: int) -> Any:
    """Concatenate matching batch tensors of two calls' arguments (the rest is taken from ``first``)."""
    if _is_batch(first, batch) and isinstance(second, Tensor):
        return torch.cat([first, second.to(first.dtype)])
    if isinstance(first, dict) and isinstance(second, dict):
        return {k: zip_cat(v, second.get(k), batch) for k, v in first.items()}
    return first


def _prediction(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def pack(pred: Tensor, return_dict: bool) -> Any:
    return Transformer2DModelOutput(sample=pred) if return_dict else (pred,)


class _Leaf(str):
    """Marks where a batch tensor sat in a call's arguments (see :meth:`Call.native_model`)."""


@dataclass(frozen=True)
class Call:
    """One denoiser call on a ``2b`` batch: its arguments and where the cond and uncond halves are."""

    forward: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    latent_arg: str
    cond: slice
    uncond: slice
    module: Any = None
    """The denoiser module the call runs (perturbations swap its processors or blocks); ``None`` if unknown."""

    @property
    def batch(self) -> int:
        return 2 * (self.cond.stop - self.cond.start)

    def latent(self) -> Tensor:
        return self.kwargs[self.latent_arg] if self.latent_arg in self.kwargs else self.args[0]

    def timestep(self) -> Tensor:
        return torch.as_tensor(self.kwargs["timestep"] if "timestep" in self.kwargs else self.args[1])

    def with_latent(self, latent: Tensor) -> Call:
        """The same call on another latent batch (all ``2b`` rows)."""
        if latent.shape != self.latent().shape:
            raise ValueError(f"latent: expected shape {tuple(self.latent().shape)}, got {tuple(latent.shape)}")
        if self.latent_arg in self.kwargs:
            return replace(self, kwargs={**self.kwargs, self.latent_arg: latent})
        return replace(self, args=(latent, *self.args[1:]))

    def run(self, rows: slice | None = None) -> Tensor:
        """The model's prediction on the whole batch (``rows=None``, the pipeline's own call), or on ``rows``."""
        args, kwargs = self.args, self.kwargs
        if rows is not None:
            n = self.batch
            args = tuple(_map_batch(a, lambda t: t[rows], n) for a in args)
            kwargs = {k: _map_batch(v, lambda t: t[rows], n) for k, v in kwargs.items()}
        return _prediction(self.forward(*args, **kwargs))

    def native_model(self) -> tuple[Callable[[Tensor, Tensor, Any], Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """This call as a native ``model(x, t, cond)`` with its conditional and unconditional conditions.

        The conditions are the call's batch tensors (prompt embeddings, pooled embeddings, SDXL time ids,
        ...) cut into halves. The latent and the timestep are the model's ``x`` and ``t``.
        """
        leaves: dict[str, Tensor] = {}
        n, has_t_kw = self.batch, "timestep" in self.kwargs

        def mark(obj: Any, path: str) -> Any:
            if _is_batch(obj, n):
                leaves[path] = obj
                return _Leaf(path)
            if isinstance(obj, dict):
                return {k: mark(v, f"{path}.{k}") for k, v in obj.items()}
            return obj

        skip = {self.latent_arg, "timestep"}
        args = tuple(a if i < (1 if has_t_kw else 2) else mark(a, f"arg{i}") for i, a in enumerate(self.args))
        kwargs = {k: v if k in skip else mark(v, k) for k, v in self.kwargs.items()}
        scalar_t = self.timestep().ndim == 0

        def fill(obj: Any, cond: dict[str, Tensor]) -> Any:
            if isinstance(obj, _Leaf):
                return cond[obj]
            if isinstance(obj, dict):
                return {k: fill(v, cond) for k, v in obj.items()}
            return obj

        def model(x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
            t_in = t[0] if scalar_t else t  # one noise level per evaluation: a 0-d timestep stays 0-d
            call_args = [fill(a, cond) for a in args]
            call_kwargs = {k: fill(v, cond) for k, v in kwargs.items()}
            call_kwargs[self.latent_arg] = x
            if self.latent_arg not in self.kwargs:
                call_args[0] = call_kwargs.pop(self.latent_arg)
            if has_t_kw:
                call_kwargs["timestep"] = t_in
            else:
                call_args[1] = t_in
            return _prediction(self.forward(*call_args, **call_kwargs))

        cond = {k: v[self.cond] for k, v in leaves.items()}
        uncond = {k: v[self.uncond] for k, v in leaves.items()}
        return model, cond, uncond
