"""Perturbations on diffusers models: attention processors swapped in for one forward, and back.

Importing this module registers diffusers' family with :func:`guidekit.engine.perturb.register`: a model
that holds diffusers attention modules (a pipeline's UNet or transformer, or a native model built from
diffusers blocks) is perturbed through :func:`changes`, by the one :func:`~guidekit.engine.perturb.applied`.

NAG (:class:`~guidekit.perturbations.NormalizedAttention`) runs on the pipeline's whole ``[uncond; cond]``
call: the cond rows' queries attend to both halves' contexts in every selected cross-attention layer
(``Attention.is_cross_attention``: the UNets' ``attn2``), and both halves continue with the NAG output.
"""

from __future__ import annotations

from typing import Any

from diffusers.hooks._helpers import TransformerBlockRegistry  # pinned diffusers 0.42.1: block input/output map
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from ...branch import Perturbation
from ...engine.perturb import KINDS, Change, Perturber, Rows, register
from ...errors import ConfigError
from ...ops.attention import blur_queries
from ...perturbations import BlurredQueries, NormalizedAttention, SkipBlocks
from .processors import IdentityAttnProcessor, NormalizedAttnProcessor, identity_processor

__all__ = ["KINDS", "IdentityAttnProcessor", "NormalizedAttnProcessor", "changes", "self_attention_layers"]


def self_attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The self-attention modules of ``model`` by name: diffusers ``Attention`` and the newer attention modules
    (``AttentionModuleMixin``: Wan's ``WanAttention``) that are not cross-attention. Joint-attention layers
    (SD3, CogVideoX) count: their visual tokens attend to each other."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, (Attention, AttentionModuleMixin)) and not m.is_cross_attention
    }


def resolve(model: nn.Module, perturbation: Perturbation) -> list[nn.Module]:
    """The modules ``perturbation.layers`` selects (:meth:`~guidekit.branch.Perturbation.select`)."""
    if isinstance(perturbation, SkipBlocks):
        blocks = {n: m for n, m in model.named_modules() if n and _is_block(m)}
        return perturbation.select(blocks, "transformer block", type(model).__name__)
    if isinstance(perturbation, NormalizedAttention):
        cross = {n: m for n, m in model.named_modules() if isinstance(m, Attention) and m.is_cross_attention}
        if not cross:
            raise ConfigError(
                f"perturbation: 'normalized-attention' acts on cross-attention layers (diffusers Attention with "
                f"is_cross_attention, the UNets' attn2); {type(model).__name__} has none (joint-attention "
                "transformers such as SD3 and Flux are not supported)"
            )
        return (
            list(cross.values())
            if not perturbation.layers
            else perturbation.select(cross, "cross-attention layer", type(model).__name__)
        )
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


def changes(model: nn.Module, perturbation: Perturbation, rows: Rows) -> list[Change]:
    """What applying ``perturbation`` to a diffusers model changes (processors, query projections, blocks).

    ``rows``: ``(branch rows, carried rows)`` of the batch for a perturbation that carries a condition of its
    own (NAG: the cond rows and the uncond rows of the pipeline's call).
    """
    modules = resolve(model, perturbation)
    if isinstance(perturbation, BlurredQueries):  # the query projection's output blurred (SEG)
        return [(m.to_q, "forward", _blurred(m.to_q.forward, perturbation.sigma)) for m in modules]
    if isinstance(perturbation, SkipBlocks):
        return [(m, "forward", _skipped(m)) for m in modules]
    if isinstance(perturbation, NormalizedAttention):
        if rows is None:
            raise ConfigError("rows: expected the branch and negative rows of the 'normalized-attention' forward")
        return [(m, "processor", NormalizedAttnProcessor(perturbation, *rows)) for m in modules]
    return [(m, "processor", identity_processor(m)) for m in modules]  # an instance attribute: no hook popping


def _owns(model: nn.Module) -> bool:
    return any(isinstance(m, (Attention, AttentionModuleMixin)) for m in model.modules())


register(Perturber(owns=_owns, changes=changes))
