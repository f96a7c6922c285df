"""Perturbations on native PyTorch models: the selected modules' forwards replaced for one forward, and back.

* :class:`~guidekit.perturbations.IdentitySelfAttention` on ``torch.nn.MultiheadAttention`` modules used as
  self-attention: the output becomes ``out_proj(v_proj(value))`` (each token attends to itself).
* :class:`~guidekit.perturbations.SkipBlocks` on any module whose output has its first input's shape (a
  residual block): it returns that input.
* :class:`~guidekit.perturbations.BlurredQueries` on ``torch.nn.MultiheadAttention``: the query blurred over
  its tokens before the attention (SEG; a finite blur needs a square token grid).

Selectors follow :mod:`guidekit.perturbations`: regular expressions searched among the attention modules'
names, whole names or dotted suffixes for blocks. A selector that matches nothing names what there is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..branch import Perturbation
from ..errors import ConfigError
from ..ops.attention import blur_queries
from ..perturbations import BlurredQueries, IdentitySelfAttention, SkipBlocks

__all__ = ["KINDS", "applied", "swapped"]

KINDS = frozenset({IdentitySelfAttention.kind, SkipBlocks.kind, BlurredQueries.kind})
"""The perturbation kinds the native backend applies."""

_UNSET: Any = object()


def _identity_attention(module: nn.MultiheadAttention) -> Callable[..., tuple[Tensor, None]]:
    e = module.embed_dim

    def forward(query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        weight = module.in_proj_weight[2 * e :] if module._qkv_same_embed_dim else module.v_proj_weight
        bias = None if module.in_proj_bias is None else module.in_proj_bias[2 * e :]
        return module.out_proj(F.linear(value, weight, bias)), None

    return forward


def _blurred_query(module: nn.MultiheadAttention, sigma: float) -> Callable[..., Any]:
    original = module.forward  # the bound class forward
    token_dim = 1 if module.batch_first else 0

    def forward(query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
        return original(blur_queries(query, sigma, token_dim), key, value, *args, **kwargs)

    return forward


def _skip(module: nn.Module) -> Callable[..., Tensor]:
    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return x

    return forward


def _select(model: nn.Module, perturbation: Perturbation) -> list[nn.Module]:
    if isinstance(perturbation, IdentitySelfAttention | BlurredQueries):
        layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
        return perturbation.select(layers, "attention (nn.MultiheadAttention) module", type(model).__name__)
    layers = {n: m for n, m in model.named_modules() if n}
    return perturbation.select(layers, "module", type(model).__name__)


@contextmanager
def applied(model: Any, perturbation: Perturbation | None) -> Iterator[None]:
    """``model`` (an ``nn.Module``) with ``perturbation`` applied inside the block, restored after."""
    if perturbation is None:
        yield
        return
    if perturbation.kind not in KINDS:
        raise ConfigError(f"perturbation: the native backend applies {sorted(KINDS)}, got {perturbation.kind!r}")
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model: expected a torch.nn.Module to apply the {perturbation.kind!r} perturbation to, got "
            f"{type(model).__name__}"
        )
    modules = _select(model, perturbation)
    if isinstance(perturbation, BlurredQueries):
        sigma = perturbation.sigma

        def make(m: nn.Module) -> Callable[..., Any]:
            return _blurred_query(m, sigma)  # type: ignore[arg-type]
    else:
        make = _identity_attention if isinstance(perturbation, IdentitySelfAttention) else _skip  # type: ignore[assignment]
    with swapped([(m, "forward", make(m)) for m in modules]):
        yield


@contextmanager
def swapped(changes: Sequence[tuple[Any, str, Any]]) -> Iterator[None]:
    """``obj.attr = value`` for each change inside the block; after it, the previous instance attribute is
    put back (or the instance attribute deleted, so the class's shows again), whatever happened inside."""
    saved = [(obj, attr, obj.__dict__.get(attr, _UNSET)) for obj, attr, _ in changes]
    try:
        for obj, attr, value in changes:
            setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, value in saved:
            if value is _UNSET:
                delattr(obj, attr)
            else:
                setattr(obj, attr, value)
