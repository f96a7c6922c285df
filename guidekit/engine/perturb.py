"""Perturbations on PyTorch models: the selected modules changed for one forward, and back.

One :func:`applied` for every backend; what a model's modules can take is a table of :class:`Perturber` by
model family (:func:`register`). The built-in family, for any ``nn.Module``:

* :class:`~guidekit.perturbations.IdentitySelfAttention` on ``torch.nn.MultiheadAttention`` modules used as
  self-attention: the output becomes ``out_proj(v_proj(value))`` (each token attends to itself). A call
  whose key is not its query is cross-attention and runs unchanged (so a selector that also matches a
  cross-attention layer, PAG's ``"mid"`` on a U-net with both, perturbs only the self-attention).
* :class:`~guidekit.perturbations.SkipBlocks` on any module whose output has its first input's shape (a
  residual block): it returns that input.
* :class:`~guidekit.perturbations.BlurredQueries` on ``torch.nn.MultiheadAttention`` used as self-attention:
  the query blurred over its tokens before the attention (SEG; a finite blur needs a square token grid);
  cross-attention calls run unchanged.
* :class:`~guidekit.perturbations.NormalizedAttention` on ``torch.nn.MultiheadAttention`` called as
  cross-attention (a key that is not the query): the batch is ``[branch rows; negative rows]``; the branch
  rows' queries attend to both halves' keys and values, NAG combines the two outputs before ``out_proj``
  and both halves continue with the result (NAG; no attention masks, ``bias_k`` or ``add_zero_attn``).

Selectors follow :mod:`guidekit.perturbations`: regular expressions searched among the attention modules'
names, whole names or dotted suffixes for blocks. A selector that matches nothing names what there is.
:mod:`guidekit.integrations.diffusers` registers diffusers' family (``Attention`` processors, transformer
blocks) when imported: a model holding diffusers attention modules, in a pipeline or in the native backend,
is perturbed through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..branch import Perturbation
from ..errors import ConfigError
from ..ops.attention import blur_queries, mha_heads, normalized_attention
from ..perturbations import BlurredQueries, IdentitySelfAttention, NormalizedAttention, SkipBlocks

__all__ = ["KINDS", "PERTURBERS", "Change", "Perturber", "Rows", "applied", "register", "swapped"]

KINDS = frozenset({IdentitySelfAttention.kind, SkipBlocks.kind, BlurredQueries.kind, NormalizedAttention.kind})
"""The perturbation kinds every model family applies (the backends' ``perturbations``)."""

_UNSET: Any = object()

Rows = tuple[slice, slice] | None
"""``(branch rows, carried rows)`` of a forward's batch, for a perturbation that carries a condition of its
own (NAG: the rows of its negative context), else ``None``."""

Change = tuple[Any, str, Any]
"""``(object, attribute, value)``: set for the forward, put back after it (:func:`swapped`)."""


@dataclass(frozen=True)
class Perturber:
    """How the models of one family take perturbations.

    Attributes:
        owns: ``model -> bool``, whether a model is of this family (it holds such modules).
        changes: ``(model, perturbation, rows) -> [Change]``, what applying ``perturbation`` changes; it
            refuses, naming what there is, a selector that matches nothing.
    """

    owns: Callable[[nn.Module], bool]
    changes: Callable[[nn.Module, Perturbation, Rows], list[Change]]


PERTURBERS: list[Perturber] = []
"""The registered families, the most specific first (the built-in one, for any module, is last)."""


def register(perturber: Perturber) -> None:
    """Perturb the models ``perturber`` owns with it (ahead of the families registered before it)."""
    PERTURBERS.insert(0, perturber)


def _identity_attention(module: nn.MultiheadAttention) -> Callable[..., Any]:
    e = module.embed_dim
    original = module.forward  # the bound class forward

    def forward(query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
        if key is not query:  # a cross-attention call: a self-attention perturbation leaves it as it is
            return original(query, key, value, *args, **kwargs)
        weight = module.in_proj_weight[2 * e :] if module._qkv_same_embed_dim else module.v_proj_weight
        bias = None if module.in_proj_bias is None else module.in_proj_bias[2 * e :]
        return module.out_proj(F.linear(value, weight, bias)), None

    return forward


def _blurred_query(module: nn.MultiheadAttention, sigma: float) -> Callable[..., Any]:
    original = module.forward  # the bound class forward
    token_dim = 1 if module.batch_first else 0

    def forward(query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
        if key is not query:  # a cross-attention call: left as it is
            return original(query, key, value, *args, **kwargs)
        return original(blur_queries(query, sigma, token_dim), key, value, *args, **kwargs)

    return forward


def _mha_heads(module: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """``module``'s attention output before ``out_proj``, batch first ``(b, n, e)`` (its projections, SDPA)."""
    q, k, v = mha_heads(module, query, key, value)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(query.shape[0], -1, module.embed_dim)


def _normalized(module: nn.MultiheadAttention, nag: NormalizedAttention, rows: Rows) -> Callable[..., Any]:
    original = module.forward
    if rows is None:
        raise ConfigError("rows: expected the branch and negative rows of the 'normalized-attention' forward")
    pos, neg = rows

    def forward(query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
        if key is query:  # self-attention: NAG acts on cross-attention only
            return original(query, key, value, *args, **kwargs)
        masks = [kwargs.get(k) for k in ("key_padding_mask", "attn_mask")] + list(args[:1]) + list(args[2:3])
        if any(m is not None for m in masks) or module.bias_k is not None or module.add_zero_attn:
            raise ConfigError(
                "perturbation: the native 'normalized-attention' perturbation supports nn.MultiheadAttention "
                "without attention masks, bias_k/bias_v or add_zero_attn, got one with them"
            )
        q, k, v = (t if module.batch_first else t.transpose(0, 1) for t in (query, key, value))
        if q.shape[0] != neg.stop:
            raise ConfigError(
                f"perturbation: expected the 'normalized-attention' forward's batch [branch rows; negative rows] "
                f"of {neg.stop} rows at this layer, got {q.shape[0]}"
            )
        z_pos = _mha_heads(module, q[pos], k[pos], v[pos])
        z_neg = _mha_heads(module, q[pos], k[neg], v[neg])
        z = module.out_proj(normalized_attention(z_pos, z_neg, nag.scale, nag.tau, nag.alpha))
        out = torch.empty(q.shape[0], *z.shape[1:], dtype=z.dtype, device=z.device)
        out[pos], out[neg] = z, z
        return (out if module.batch_first else out.transpose(0, 1)), None

    return forward


def _skip(module: nn.Module) -> Callable[..., Tensor]:
    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return x

    return forward


def _select(model: nn.Module, perturbation: Perturbation) -> list[nn.Module]:
    if isinstance(perturbation, IdentitySelfAttention | BlurredQueries | NormalizedAttention):
        layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
        return perturbation.select(layers, "attention (nn.MultiheadAttention) module", type(model).__name__)
    layers = {n: m for n, m in model.named_modules() if n}
    return perturbation.select(layers, "module", type(model).__name__)


def _mha_changes(model: nn.Module, perturbation: Perturbation, rows: Rows) -> list[Change]:
    """The built-in family: ``nn.MultiheadAttention`` for the attention kinds, any module for skipped blocks."""
    modules = _select(model, perturbation)
    if isinstance(perturbation, NormalizedAttention):
        if not perturbation.layers:
            modules = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
            if not modules:
                raise ConfigError(
                    f"perturbation: 'normalized-attention' acts on nn.MultiheadAttention cross-attention layers; "
                    f"{type(model).__name__} has none"
                )
        return [(m, "forward", _normalized(m, perturbation, rows)) for m in modules]  # type: ignore[arg-type]
    if isinstance(perturbation, BlurredQueries):
        return [(m, "forward", _blurred_query(m, perturbation.sigma)) for m in modules]  # type: ignore[arg-type]
    make = _identity_attention if isinstance(perturbation, IdentitySelfAttention) else _skip
    return [(m, "forward", make(m)) for m in modules]  # type: ignore[arg-type]


PERTURBERS.append(Perturber(owns=lambda model: True, changes=_mha_changes))


@contextmanager
def applied(model: Any, perturbation: Perturbation | None, rows: Rows = None) -> Iterator[None]:
    """``model`` (an ``nn.Module``) with ``perturbation`` applied inside the block, restored after, through
    the first registered family that owns it (:data:`PERTURBERS`).

    ``rows``: ``(branch rows, carried rows)`` of the batch, for a perturbation that carries conditions of
    its own (:meth:`~guidekit.branch.Perturbation.conditions`).
    """
    if perturbation is None:
        yield
        return
    if perturbation.kind not in KINDS:
        raise ConfigError(f"perturbation: the backends apply {sorted(KINDS)}, got {perturbation.kind!r}")
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model: expected a torch.nn.Module to apply the {perturbation.kind!r} perturbation to, got "
            f"{type(model).__name__}"
        )
    perturber = next(p for p in PERTURBERS if p.owns(model))
    with swapped(perturber.changes(model, perturbation, rows)):
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
