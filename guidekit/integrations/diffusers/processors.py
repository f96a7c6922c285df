"""The attention processors of the perturbations: identity self-attention (PAG, STG-A) for every attention
processor of the supported diffusers families, and NAG's normalized cross-attention
(:class:`NormalizedAttnProcessor`).

PAG (Ahn et al., ECCV 2024, arXiv 2403.17377) replaces a self-attention map by the identity, so each token's
output is its own value: ``to_out(to_v(h))``. That is the whole rule in a layer of visual tokens only (the
UNets' ``attn1`` under ``AttnProcessor2_0``, Wan's ``attn1``). A *joint*-attention layer puts visual and
text tokens in one softmax (SD3's MMDiT, CogVideoX); there the rule is stated on the visual-visual block of
the map: it becomes the identity, while attention to and from the text tokens is kept. Each visual token
attends to itself and to the text; text tokens attend as before. This is the rule of diffusers'
``PAGJointAttnProcessor2_0`` (``StableDiffusion3PAGPipeline``) and of the official CogVideoX STG-A pipeline
(junhahyung/STGuidance). Two places where we differ, both documented in ``docs/math.md``:

* diffusers' perturbed path skips the query/key norms (``norm_q``, ``norm_k``, ``norm_added_q/k``) of models
  that have them (SD3.5); we apply the layer's own norms, so the only change is the map.
* the official CogVideoX mask puts the identity block on the *first* ``n_video`` positions, but CogVideoX
  orders the text first, so the block it perturbs straddles text and video tokens; we place it on the video
  tokens.

:func:`identity_processor` picks the processor for a module's current one and names the supported ones
otherwise. The processors run on the whole batch they are given (the engine groups perturbed rows).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    CogVideoXAttnProcessor2_0,
    JointAttnProcessor2_0,
)
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from torch import Tensor, nn

from ...errors import ConfigError
from ...ops.attention import normalized_attention
from ...perturbations import NormalizedAttention

__all__ = [
    "CogVideoXIdentityAttnProcessor",
    "IdentityAttnProcessor",
    "JointIdentityAttnProcessor",
    "NormalizedAttnProcessor",
    "WanIdentityAttnProcessor",
    "identity_processor",
    "joint_identity_mask",
    "unet_tokens",
]


def joint_identity_mask(visual: slice, length: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Additive ``(length, length)`` mask: ``-inf`` on the visual-visual block except its diagonal, 0 elsewhere."""
    mask = torch.zeros(length, length, dtype=dtype, device=device)
    block = mask[visual, visual]
    block.fill_(float("-inf")).fill_diagonal_(0.0)
    return mask


def _heads(x: Tensor, heads: int) -> Tensor:
    """``(b, n, h·d)`` -> ``(b, h, n, d)``."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """``(b, h, n, d)`` -> ``(b, n, h·d)``."""
    return x.transpose(1, 2).flatten(2)


def _norm(norm: nn.Module | None, x: Tensor) -> Tensor:
    return x if norm is None else norm(x)


def unet_tokens(
    attn: Attention, hidden_states: Tensor, temb: Tensor | None
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """What every U-net ``Attention`` processor does around its attention (diffusers' ``AttnProcessor2_0``):
    ``hidden_states`` as ``(b, n, c)`` tokens (spatial norm, 4D -> tokens, group norm), and the function
    that finishes the attention output (tokens -> 4D, the residual connection, the output rescale)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape = hidden_states.shape
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.flatten(2).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    def finish(out: Tensor) -> Tensor:
        if len(shape) == 4:
            out = out.transpose(-1, -2).reshape(shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    return hidden_states, finish


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
        tokens, finish = unet_tokens(attn, hidden_states, temb)
        return finish(attn.to_out[1](attn.to_out[0](attn.to_v(tokens).to(tokens.dtype))))


class JointIdentityAttnProcessor:
    """SD3's joint attention (``JointAttnProcessor2_0``) with the image-image block of the map the identity."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if encoder_hidden_states is None:  # a self-attention-only layer (SD3.5's attn2): plain identity
            return attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))
        heads, n_image = attn.heads, hidden_states.shape[1]
        query = _norm(attn.norm_q, _heads(attn.to_q(hidden_states), heads))
        key = _norm(attn.norm_k, _heads(attn.to_k(hidden_states), heads))
        value = _heads(attn.to_v(hidden_states), heads)
        query = torch.cat([query, _norm(attn.norm_added_q, _heads(attn.add_q_proj(encoder_hidden_states), heads))], 2)
        key = torch.cat([key, _norm(attn.norm_added_k, _heads(attn.add_k_proj(encoder_hidden_states), heads))], 2)
        value = torch.cat([value, _heads(attn.add_v_proj(encoder_hidden_states), heads)], 2)
        mask = joint_identity_mask(slice(0, n_image), query.shape[2], query.dtype, query.device)
        out = _merge(F.scaled_dot_product_attention(query, key, value, attn_mask=mask)).to(query.dtype)
        image, text = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return attn.to_out[1](attn.to_out[0](image)), text


class CogVideoXIdentityAttnProcessor:
    """CogVideoX's joint attention (text tokens first, RoPE on the video tokens) with the video-video block of
    the map the identity (STG-A)."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        image_rotary_emb: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        if attention_mask is not None:
            raise ConfigError("attention_mask: identity self-attention on CogVideoX takes no attention mask")
        n_text = encoder_hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        query = _norm(attn.norm_q, _heads(attn.to_q(joint), attn.heads))
        key = _norm(attn.norm_k, _heads(attn.to_k(joint), attn.heads))
        value = _heads(attn.to_v(joint), attn.heads)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query = torch.cat([query[:, :, :n_text], apply_rotary_emb(query[:, :, n_text:], image_rotary_emb)], 2)
            key = torch.cat([key[:, :, :n_text], apply_rotary_emb(key[:, :, n_text:], image_rotary_emb)], 2)
        mask = joint_identity_mask(slice(n_text, joint.shape[1]), joint.shape[1], query.dtype, query.device)
        out = attn.to_out[1](attn.to_out[0](_merge(F.scaled_dot_product_attention(query, key, value, attn_mask=mask))))
        text, video = out.split([n_text, out.shape[1] - n_text], dim=1)
        return video, text


class WanIdentityAttnProcessor:
    """Wan's self-attention (``attn1``, video tokens only) with the identity map: ``to_out(to_v(h))``."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        rotary_emb: Any = None,
    ) -> Tensor:
        return attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))


class NormalizedAttnProcessor:
    """NAG in a cross-attention layer: rows ``positive`` attend to their context and to rows ``negative``'s
    context with the same queries; both row sets get ``to_out(normalized_attention(z⁺, z⁻))``."""

    def __init__(self, nag: NormalizedAttention, positive: slice, negative: slice) -> None:
        self.nag, self.positive, self.negative = nag, positive, negative

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        if encoder_hidden_states is None:
            raise ConfigError("perturbation: 'normalized-attention' needs a cross-attention call, got no context")
        hidden_states, finish = unet_tokens(attn, hidden_states, temb)
        b = hidden_states.shape[0]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], b)
            attention_mask = attention_mask.view(b, attn.heads, -1, attention_mask.shape[-1])
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        q = _norm(attn.norm_q, _heads(attn.to_q(hidden_states), attn.heads))
        k = _norm(attn.norm_k, _heads(attn.to_k(encoder_hidden_states), attn.heads))
        v = _heads(attn.to_v(encoder_hidden_states), attn.heads)
        pos, neg = self.positive, self.negative

        def attend(keys: slice) -> Tensor:
            mask = None if attention_mask is None else attention_mask[keys]
            return _merge(F.scaled_dot_product_attention(q[pos], k[keys], v[keys], attn_mask=mask)).to(q.dtype)

        nag = self.nag
        z = normalized_attention(attend(pos), attend(neg), nag.scale, nag.tau, nag.alpha)
        out = torch.empty(b, *z.shape[1:], dtype=z.dtype, device=z.device)
        out[pos], out[neg] = z, z
        return finish(attn.to_out[1](attn.to_out[0](out)))


_PROCESSORS: dict[type, type] = {
    AttnProcessor: IdentityAttnProcessor,
    AttnProcessor2_0: IdentityAttnProcessor,
    JointAttnProcessor2_0: JointIdentityAttnProcessor,
    CogVideoXAttnProcessor2_0: CogVideoXIdentityAttnProcessor,
    WanAttnProcessor: WanIdentityAttnProcessor,
}


def identity_processor(module: nn.Module) -> Any:
    """The identity-attention processor standing in for ``module``'s current one."""
    current = type(module.processor)
    if current not in _PROCESSORS:
        supported = ", ".join(sorted(p.__name__ for p in _PROCESSORS))
        raise ConfigError(
            f"perturbation: identity self-attention supports the attention processors {supported}; a "
            f"{type(module).__name__} layer uses {current.__name__}"
        )
    if getattr(module, "fused_projections", False):
        raise ConfigError(
            f"perturbation: a {type(module).__name__} layer has fused q/k/v projections; call "
            "unfuse_qkv_projections() first"
        )
    return _PROCESSORS[current]()
