"""The attention observer of the native backend: attention maps recorded during a forward, on request.

A branch that sets ``observe=AttentionMaps(layers, which)`` (:class:`guidekit.branch.AttentionMaps`) gets,
for its rows, each selected ``torch.nn.MultiheadAttention``'s attention probabilities averaged over heads,
``(b, queries, keys)``, as ``"self:<name>"`` or ``"cross:<name>"`` (a call whose key is its query is
self-attention). They are computed beside the module's own forward from its input projections (the
forward and its output are untouched) by forward hooks that exist only for that forward: a plan that
observes nothing installs none. A module called several times in one forward keeps its first map.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..branch import AttentionMaps
from ..errors import ConfigError

__all__ = ["mha_attention_map", "observed"]


def mha_attention_map(module: nn.MultiheadAttention, query: Tensor, key: Tensor) -> Tensor:
    """``softmax(q kᵀ / √d)`` of ``module`` averaged over heads, ``(b, queries, keys)`` (batch first)."""
    if not module.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    e, h = module.embed_dim, module.num_heads
    if module._qkv_same_embed_dim:
        wq, wk = module.in_proj_weight[:e], module.in_proj_weight[e : 2 * e]
    else:
        wq, wk = module.q_proj_weight, module.k_proj_weight
    bq, bk = (None, None) if module.in_proj_bias is None else (module.in_proj_bias[:e], module.in_proj_bias[e : 2 * e])
    b, d = query.shape[0], e // h
    q = torch.nn.functional.linear(query, wq, bq).view(b, -1, h, d).transpose(1, 2)
    k = torch.nn.functional.linear(key, wk, bk).view(b, -1, h, d).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1).mean(1)


def _layers(model: nn.Module, spec: AttentionMaps) -> dict[str, nn.MultiheadAttention]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    return spec.select_named(layers, "attention (nn.MultiheadAttention) module", type(model).__name__)


@contextmanager
def observed(model: Any, specs: Sequence[AttentionMaps]) -> Iterator[dict[AttentionMaps, dict[str, Tensor]]]:
    """Record the maps ``specs`` ask for during the block: ``{spec: {layer name: (rows, q, k) map}}``, filled
    as the forward runs (all of its rows); the hooks are removed after the block."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected a torch.nn.Module to record attention maps of, got {type(model).__name__}")
    record: dict[AttentionMaps, dict[str, Tensor]] = {spec: {} for spec in specs}
    handles = []
    try:
        for spec in specs:
            for name, module in _layers(model, spec).items():

                def hook(
                    m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, *, spec=spec, name=name
                ) -> None:
                    query = args[0] if args else kwargs["query"]
                    key = args[1] if len(args) > 1 else kwargs["key"]
                    entry = f"{'self' if key is query else 'cross'}:{name}"
                    if entry.split(":")[0] not in spec.kinds or entry in record[spec]:
                        return
                    with torch.no_grad():
                        record[spec][entry] = mha_attention_map(m, query, key)  # type: ignore[arg-type]

                handles.append(module.register_forward_hook(hook, with_kwargs=True))
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
