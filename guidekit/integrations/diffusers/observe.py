"""diffusers' ``Attention`` in the attention observer (:mod:`guidekit.engine.observe`).

Importing this module registers a :class:`~guidekit.engine.observe.Recorder` for diffusers' ``Attention``: a
layer is self-attention unless ``is_cross_attention``; its map is computed from its own projections the way its
processor does (``get_attention_scores``, the map diffusers' ``StableDiffusionSAGPipeline`` stores), averaged
over heads. Joint-attention layers (image and text tokens in one softmax: SD3, Flux, CogVideoX) are refused by
name. Both the diffusers backends and the native backend (a model built from diffusers blocks) record through
it.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import Tensor

from ...engine.observe import Recorder, register
from ...errors import ConfigError

__all__ = ["attention_map"]


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
        return torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1).mean(1)
    probs = attn.get_attention_scores(attn.head_to_batch_dim(q), attn.head_to_batch_dim(k), None)
    return probs.view(b, attn.heads, *probs.shape[1:]).mean(1)


def _kind(attn: Attention) -> str:
    return "cross" if attn.is_cross_attention else "self"


def _record(attn: Attention, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, Tensor]:
    hidden = args[0] if args else kwargs["hidden_states"]
    context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
    return _kind(attn), attention_map(attn, hidden, context)


def _check(name: str, attn: Attention) -> None:
    if attn.added_kv_proj_dim is not None:
        raise ConfigError(
            "observe: attention maps of joint-attention layers (image and text tokens in one softmax: SD3, Flux, "
            f"CogVideoX) are not recorded; the selected layers include {name!r}"
        )


register(Attention, Recorder(kind=_kind, record=_record, check=_check, what="diffusers Attention"))
