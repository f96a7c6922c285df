"""The attention observer on diffusers models: maps recorded by forward pre-hooks for one forward.

A branch's :class:`~guidekit.branch.AttentionMaps` selects diffusers ``Attention`` modules (self-attention:
not ``is_cross_attention``; cross-attention: ``is_cross_attention``). A pre-hook computes the module's
attention probabilities from its own projections the way its processor does (``get_attention_scores``, the
map diffusers' ``StableDiffusionSAGPipeline`` stores), averaged over heads, ``(b, queries, keys)``, recorded
as ``"self:<name>"`` or ``"cross:<name>"``; the module's forward is untouched and the hooks exist only for
that forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from ...branch import AttentionMaps
from ...errors import ConfigError

__all__ = ["attention_map", "observed"]


def attention_map(attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None) -> Tensor:
    """``attn``'s attention probabilities on these inputs, averaged over heads: ``(b, queries, keys)``."""
    h = hidden_states
    if attn.spatial_norm is not None:
        raise ConfigError("observe: attention maps of layers with a spatial norm are not supported")
    if h.ndim == 4:
        b, c, hh, ww = h.shape
        h = h.view(b, c, hh * ww).transpose(1, 2)
    if attn.group_norm is not None:
        h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
    context = h if encoder_hidden_states is None else encoder_hidden_states
    if encoder_hidden_states is not None and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    q, k = attn.to_q(h), attn.to_k(context)
    b = q.shape[0]
    if attn.norm_q is not None or attn.norm_k is not None:
        d = k.shape[-1] // attn.heads
        q, k = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (q, k))
        q = q if attn.norm_q is None else attn.norm_q(q)
        k = k if attn.norm_k is None else attn.norm_k(k)
        probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)
        return probs.mean(1)
    probs = attn.get_attention_scores(attn.head_to_batch_dim(q), attn.head_to_batch_dim(k), None)
    return probs.view(b, attn.heads, *probs.shape[1:]).mean(1)


def _layers(model: nn.Module, spec: AttentionMaps) -> dict[str, Attention]:
    kinds = spec.kinds
    layers = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, Attention) and ("cross" if m.is_cross_attention else "self") in kinds
    }
    what = "attention layer" if spec.which == "both" else f"{spec.which}-attention layer"
    chosen = spec.select_named(layers, what, type(model).__name__)
    joint = sorted(n for n, m in chosen.items() if m.added_kv_proj_dim is not None)
    if joint:
        raise ConfigError(
            f"observe: attention maps of joint-attention layers (image and text tokens in one softmax: SD3, Flux, "
            f"CogVideoX) are not recorded; the selectors {list(spec.layers)} pick {joint[:4]}"
        )
    return chosen


@contextmanager
def observed(model: nn.Module, specs: Sequence[AttentionMaps]) -> Iterator[dict[AttentionMaps, dict[str, Tensor]]]:
    """Record the maps ``specs`` ask for during the block: ``{spec: {layer name: (rows, q, k) map}}``; the
    hooks are removed after it. A layer called several times in one forward keeps its first map."""
    record: dict[AttentionMaps, dict[str, Tensor]] = {spec: {} for spec in specs}
    handles = []
    try:
        for spec in specs:
            for name, module in _layers(model, spec).items():

                def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, spec=spec, name=name) -> None:
                    entry = f"{'cross' if m.is_cross_attention else 'self'}:{name}"  # type: ignore[union-attr]
                    if entry in record[spec]:
                        return
                    hidden = args[0] if args else kwargs["hidden_states"]
                    context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
                    with torch.no_grad():
                        record[spec][entry] = attention_map(m, hidden, context)  # type: ignore[arg-type]

                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield record
    finally:
        for handle in handles:
            handle.remove()
