"""Perturbations on diffusers models: attention processors swapped in for one forward, and back."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from ...branch import Perturbation
from ...errors import ConfigError
from ...perturbations import IdentitySelfAttention

__all__ = ["KINDS", "IdentityAttnProcessor", "applied", "self_attention_layers"]

KINDS = frozenset({IdentitySelfAttention.kind})
"""The perturbation kinds the diffusers backends apply."""


def self_attention_layers(model: nn.Module) -> dict[str, Attention]:
    """The self-attention modules of ``model`` by name (diffusers ``Attention`` that is not cross-attention)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Attention) and not m.is_cross_attention}


def _matches(selector: str, name: str) -> bool:
    """diffusers' PAG rule (``pag_utils._set_pag_attn_processor``), kept for parity: a regex search, less
    its "fake integral match" exclusion."""
    if re.search(selector, name) is None:
        return False
    last, own = selector.split(".")[-1], name.split(".")[-1]
    return not (last.isnumeric() and own.isnumeric() and last == own)


def resolve(model: nn.Module, perturbation: Perturbation) -> list[Attention]:
    """The modules ``perturbation.layers`` selects, refused by name when a selector matches none."""
    layers = self_attention_layers(model)
    chosen: dict[str, Attention] = {}
    for selector in perturbation.layers:
        hits = {n: m for n, m in layers.items() if _matches(selector, n)}
        if not hits:
            raise ConfigError(
                f"perturbation: layer selector {selector!r} matches no self-attention layer of "
                f"{type(model).__name__}; its self-attention layers are {sorted(layers)}"
            )
        chosen.update(hits)
    return list(chosen.values())


class IdentityAttnProcessor:
    """Self-attention with the identity map: ``to_out(to_v(h))`` (diffusers' PAG perturbed path, whole batch)."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        dtype = hidden_states.dtype
        hidden_states = attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states).to(dtype)))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def applied(model: nn.Module, perturbation: Perturbation | None) -> Iterator[None]:
    """``model`` with ``perturbation`` applied for the duration of the block, its processors restored after."""
    if perturbation is None:
        yield
        return
    if perturbation.kind not in KINDS:
        raise ConfigError(f"perturbation: the diffusers backends apply {sorted(KINDS)}, got {perturbation.kind!r}")
    modules = resolve(model, perturbation)
    saved = [(m, m.processor) for m in modules]
    try:
        for m in modules:
            m.processor = IdentityAttnProcessor()  # plain attribute: set_processor would log and pop hooks
        yield
    finally:
        for m, processor in saved:
            m.processor = processor
