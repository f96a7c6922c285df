"""Perturbations on diffusers models: attention processors swapped in for one forward, and back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from diffusers.hooks._helpers import TransformerBlockRegistry  # pinned diffusers 0.42.1: block input/output map
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from ...branch import Perturbation
from ...engine.perturb import swapped
from ...errors import ConfigError
from ...ops.attention import blur_queries
from ...perturbations import BlurredQueries, IdentitySelfAttention, SkipBlocks

__all__ = ["KINDS", "IdentityAttnProcessor", "applied", "self_attention_layers"]

KINDS = frozenset({IdentitySelfAttention.kind, SkipBlocks.kind, BlurredQueries.kind})
"""The perturbation kinds the diffusers backends apply."""


def self_attention_layers(model: nn.Module) -> dict[str, Attention]:
    """The self-attention modules of ``model`` by name (diffusers ``Attention`` that is not cross-attention)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Attention) and not m.is_cross_attention}


def resolve(model: nn.Module, perturbation: Perturbation) -> list[nn.Module]:
    """The modules ``perturbation.layers`` selects (:meth:`~guidekit.branch.Perturbation.select`)."""
    if isinstance(perturbation, SkipBlocks):
        blocks = {n: m for n, m in model.named_modules() if n and _is_block(m)}
        return perturbation.select(blocks, "transformer block", type(model).__name__)
    return perturbation.select(self_attention_layers(model), "self-attention layer", type(model).__name__)


def _is_block(module: nn.Module) -> bool:
    """A transformer block diffusers knows the inputs and outputs of (its hook registry's metadata)."""
    try:
        TransformerBlockRegistry.get(type(module))
    except ValueError:
        return False
    return True


def _blurred(to_q: Any, sigma: float) -> Any:
    def forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return blur_queries(to_q(hidden_states, *args, **kwargs), sigma)

    return forward


def _skipped(block: nn.Module) -> Any:
    """A forward that returns the block's inputs in the places of its outputs (diffusers' block metadata)."""
    meta = TransformerBlockRegistry.get(type(block))

    def forward(*args: Any, **kwargs: Any) -> Any:
        hidden = meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs)
        if meta.return_encoder_hidden_states_index is None:
            return hidden
        encoder = meta._get_parameter_from_args_kwargs(meta.encoder_hidden_states_argument_name, args, kwargs)
        out: list[Any] = [None, None]
        out[meta.return_hidden_states_index] = hidden
        out[meta.return_encoder_hidden_states_index] = encoder
        return tuple(out)

    return forward


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
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected the pipeline's denoiser module to perturb, got {type(model).__name__}")
    modules = resolve(model, perturbation)
    if isinstance(perturbation, BlurredQueries):  # the query projection's output blurred (SEG)
        changes = [(m.to_q, "forward", _blurred(m.to_q.forward, perturbation.sigma)) for m in modules]
    elif isinstance(perturbation, SkipBlocks):
        changes = [(m, "forward", _skipped(m)) for m in modules]
    else:  # an instance attribute: set_processor would log and pop hooks
        changes = [(m, "processor", IdentityAttnProcessor()) for m in modules]
    with swapped(changes):
        yield
