"""guidekit's perturbations as ComfyUI model patches (``transformer_options["patches_replace"]``).

ComfyUI addresses the places a patch can replace by its own keys, so the layer selectors of a perturbation
are matched against these names:

* **self-attention** (PAG's identity map, SEG's blurred queries): the ``attn1`` of every transformer block of
  a U-net, named ``"<input|middle|output>.<block>.<index>"`` after ComfyUI's ``(block, number,
  transformer_index)`` patch key (``"middle.0.0"``; PAG's default selector ``"mid"`` finds it, the block
  ComfyUI's own PAG node patches). The patch gets the block's ``q, k, v`` and returns the attention output
  before ``to_out``: ``v`` for the identity map, attention with blurred queries for SEG.
* **blocks** (SLG, STG-R): the blocks of a DiT that ComfyUI can replace (``patches_replace["dit"]``), named
  ``"double_block.<i>"`` / ``"single_block.<i>"`` after its keys (Wan's ``blocks``, Flux's double and single
  blocks, SD3's joint blocks); a skipped block returns its inputs, as ComfyUI's SkipLayerGuidanceDiT node does.

Selectors follow the perturbation's own rule (:meth:`guidekit.branch.Perturbation.select`): regular
expressions searched in the names for attention, names or dotted suffixes for blocks. A selector that matches
nothing names what the model has; a model without such places (identity attention on a DiT whose attention
ComfyUI cannot replace, block skipping on a U-net) is refused by name.
"""

from __future__ import annotations

from typing import Any

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_patcher
from torch import Tensor, nn

from guidekit.branch import Perturbation
from guidekit.errors import ConfigError
from guidekit.ops.attention import blur_queries
from guidekit.perturbations import BlurredQueries, IdentitySelfAttention, SkipBlocks

__all__ = ["KINDS", "attention_targets", "block_targets", "with_perturbation"]

KINDS = frozenset({IdentitySelfAttention.kind, BlurredQueries.kind, SkipBlocks.kind})
"""The perturbation kinds the Guidekit Guider applies in ComfyUI."""

_UNET_PARTS = (("input", "input_blocks"), ("middle", "middle_block"), ("output", "output_blocks"))
_DIT_PARTS = (("double_block", "blocks"), ("double_block", "double_blocks"), ("double_block", "joint_blocks"))
_DIT_SINGLE = (("single_block", "single_blocks"),)


def attention_targets(diffusion_model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """The ``attn1`` patch keys of a ComfyUI U-net by name (``"middle.0.0" -> ("middle", 0, 0)``)."""
    targets: dict[str, tuple[str, int, int]] = {}
    for part, attr in _UNET_PARTS:
        blocks = getattr(diffusion_model, attr, None)
        if blocks is None:
            continue
        numbered = [(0, blocks)] if part == "middle" else list(enumerate(blocks))
        for number, block in numbered:
            for module in block.modules():
                if isinstance(module, comfy_attention.SpatialTransformer):
                    for index in range(len(module.transformer_blocks)):
                        targets[f"{part}.{number}.{index}"] = (part, number, index)
    return targets


def block_targets(diffusion_model: nn.Module) -> dict[str, tuple[str, int]]:
    """The ``dit`` block patch keys of a ComfyUI DiT by name (``"double_block.7" -> ("double_block", 7)``)."""
    targets: dict[str, tuple[str, int]] = {}
    for kind, attr in _DIT_PARTS + _DIT_SINGLE:
        blocks = getattr(diffusion_model, attr, None)
        if isinstance(blocks, nn.ModuleList) and not any(k.startswith(kind) for k in targets):
            targets.update({f"{kind}.{i}": (kind, i) for i in range(len(blocks))})
    return targets


def _identity(q: Tensor, k: Tensor, v: Tensor, extra_options: dict[str, Any], mask: Any = None) -> Tensor:
    return v


def _blurred(sigma: float) -> Any:
    def attention(q: Tensor, k: Tensor, v: Tensor, extra_options: dict[str, Any], mask: Any = None) -> Tensor:
        return comfy_attention.optimized_attention(blur_queries(q, sigma), k, v, extra_options["n_heads"])

    return attention


def _skip(args: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    return args


def with_perturbation(
    model_options: dict[str, Any], perturbation: Perturbation | None, diffusion_model: nn.Module
) -> dict[str, Any]:
    """A copy of ``model_options`` that applies ``perturbation`` (the same options for ``None``)."""
    if perturbation is None:
        return model_options
    name = type(diffusion_model).__name__
    options = {**model_options, "transformer_options": dict(model_options.get("transformer_options", {}))}
    if isinstance(perturbation, SkipBlocks):
        blocks = block_targets(diffusion_model)
        if not blocks:
            raise ConfigError(
                f"perturbation: 'skip-blocks' needs a DiT whose blocks ComfyUI can replace (Wan, Flux, SD3); {name} "
                "has none"
            )
        for number in perturbation.select(blocks, "block", name):
            options = comfy.model_patcher.set_model_options_patch_replace(options, _skip, "dit", *number)
        return options
    if isinstance(perturbation, (IdentitySelfAttention, BlurredQueries)):
        layers = attention_targets(diffusion_model)
        if not layers:
            raise ConfigError(
                f"perturbation: {perturbation.kind!r} replaces U-net self-attention (ComfyUI attn1 patches); {name} "
                "has none (on a DiT use block skipping, e.g. gk.SLG or gk.STG)"
            )
        patch = _identity if isinstance(perturbation, IdentitySelfAttention) else _blurred(perturbation.sigma)
        for part, number, index in perturbation.select(layers, "self-attention layer", name):
            options = comfy.model_patcher.set_model_options_patch_replace(options, patch, "attn1", part, number, index)
        return options
    raise ConfigError(f"perturbation: the Guidekit Guider applies {sorted(KINDS)}, got {perturbation.kind!r}")
