"""The attention observer: attention maps recorded during a forward, on request, for every backend.

A branch that sets ``observe=AttentionMaps(layers, which)`` (:class:`guidekit.branch.AttentionMaps`) gets,
for its rows, each selected attention layer's probabilities averaged over heads, ``(b, queries, keys)``,
recorded as ``"self:<name>"`` or ``"cross:<name>"``. They are computed beside the layer's own forward from its
projections, by forward pre-hooks that exist only for that forward: the forward and its output are untouched,
and a plan that observes nothing installs none. A layer called several times in one forward keeps its first
map.

Which modules are attention layers is a table of :class:`Recorder` by module type (:func:`register`):
``torch.nn.MultiheadAttention`` here (self or cross decided per call: a key that is its query is
self-attention); :mod:`guidekit.integrations.diffusers` adds diffusers' ``Attention`` when imported, so the
native backend and the diffusers backends record through this one observer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..branch import AttentionMaps
from ..errors import ConfigError
from ..ops.attention import mha_heads

__all__ = ["RECORDERS", "Recorder", "mha_attention_map", "observed", "register"]


@dataclass(frozen=True)
class Recorder:
    """How to record one attention module type.

    Attributes:
        kind: ``module -> "self" | "cross" | None``: the layer's kind when it is fixed (diffusers'
            ``is_cross_attention``), ``None`` when a call decides (``nn.MultiheadAttention``).
        record: ``(module, args, kwargs) -> (kind, map)``: the call's kind and its head-averaged map.
        check: ``(name, module) -> None``, raising :class:`~guidekit.errors.ConfigError` for a selected layer
            whose map cannot be recorded (joint attention).
        what: the layer description for error messages.
    """

    kind: Callable[[Any], str | None]
    record: Callable[[Any, tuple[Any, ...], dict[str, Any]], tuple[str, Tensor]]
    check: Callable[[str, Any], None]
    what: str


RECORDERS: dict[type, Recorder] = {}
"""Attention module type -> :class:`Recorder` (``nn.MultiheadAttention``; diffusers' ``Attention`` once
:mod:`guidekit.integrations.diffusers` is imported)."""


def register(module_type: type, recorder: Recorder) -> None:
    """Record attention maps of ``module_type`` modules (replaces an earlier recorder of that type)."""
    RECORDERS[module_type] = recorder


def mha_attention_map(module: nn.MultiheadAttention, query: Tensor, key: Tensor) -> Tensor:
    """``softmax(q kᵀ / √d)`` of ``module`` averaged over heads, ``(b, queries, keys)`` (batch first)."""
    if not module.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    q, k, _ = mha_heads(module, query, key)
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).mean(1)


def _record_mha(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, Tensor]:
    query = args[0] if args else kwargs["query"]
    key = args[1] if len(args) > 1 else kwargs["key"]
    return ("self" if key is query else "cross"), mha_attention_map(module, query, key)


register(
    nn.MultiheadAttention,
    Recorder(kind=lambda m: None, record=_record_mha, check=lambda n, m: None, what="nn.MultiheadAttention"),
)


def _recorder(module: nn.Module) -> Recorder | None:
    for cls in type(module).__mro__:
        if cls in RECORDERS:
            return RECORDERS[cls]
    return None


def _layers(model: nn.Module, spec: AttentionMaps) -> dict[str, tuple[nn.Module, Recorder]]:
    layers: dict[str, tuple[nn.Module, Recorder]] = {}
    for name, module in model.named_modules():
        recorder = _recorder(module)
        if recorder is not None and recorder.kind(module) in (None, *spec.kinds):
            layers[name] = (module, recorder)
    whats = sorted({r.what for _, r in layers.values()} or {r.what for r in RECORDERS.values()})
    what = f"{'' if spec.which == 'both' else spec.which + '-'}attention layer ({', '.join(whats)})"
    chosen = spec.select_named(layers, what, type(model).__name__)
    for name, (module, recorder) in chosen.items():
        recorder.check(name, module)
    return chosen


@contextmanager
def observed(model: Any, specs: Sequence[AttentionMaps]) -> Iterator[dict[AttentionMaps, dict[str, Tensor]]]:
    """Record the maps ``specs`` ask for during the block: ``{spec: {"self:<name>" | "cross:<name>": map}}``,
    each ``(rows, queries, keys)`` over all of the forward's rows; the hooks are removed after the block."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected a torch.nn.Module to record attention maps of, got {type(model).__name__}")
    record: dict[AttentionMaps, dict[str, Tensor]] = {spec: {} for spec in specs}
    handles = []
    try:
        for spec in specs:
            for name, (module, recorder) in _layers(model, spec).items():

                def hook(
                    m: nn.Module,
                    args: tuple[Any, ...],
                    kwargs: dict[str, Any],
                    *,
                    spec: AttentionMaps = spec,
                    name: str = name,
                    recorder: Recorder = recorder,
                ) -> None:
                    if any(k.endswith(":" + name) for k in record[spec]):
                        return
                    with torch.no_grad():
                        kind, amap = recorder.record(m, args, kwargs)
                    if kind in spec.kinds:
                        record[spec][f"{kind}:{name}"] = amap

                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield record
    finally:
        for handle in handles:
            handle.remove()
    for spec, maps in record.items():
        if not maps:
            raise ConfigError(
                f"observe: the layers {list(spec.layers)} of {type(model).__name__} ran no {spec.which}-attention "
                "(a self-attention call has its query as key, a cross-attention call another key)"
            )
