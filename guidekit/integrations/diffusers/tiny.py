"""Tiny random-weight diffusers pipelines built from configs in-process (nothing is downloaded).

The configs follow diffusers' own test suite (``get_dummy_components``). The CLIP tokenizer is built in
memory from the byte-level alphabet, so SD 1.x, SDXL and ModelScope encode real prompt strings; SD3,
CogVideoX and Wan have no text encoder and take seeded random ``prompt_embeds`` instead. The weights are
random: these pipelines test plumbing (layouts, prediction types, schedulers, NFE), never image quality.

>>> from guidekit.integrations.diffusers.tiny import tiny_pipeline
>>> pipe, kwargs = tiny_pipeline("sd")   # kwargs: prompt / embeddings and a small resolution
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import ConfigError

__all__ = ["TINY_FAMILIES", "tiny_pipeline"]

TINY_FAMILIES = ("sd", "sdxl", "sd3", "cogvideox", "wan", "modelscope")
"""Keys accepted by :func:`tiny_pipeline`, one per supported pipeline family."""


def _byte_alphabet() -> list[str]:
    """The CLIP / GPT-2 byte-to-unicode map (every byte gets a printable character)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_tokenizer() -> Any:
    """A byte-level CLIP tokenizer built in memory (518 tokens, two merges), max length 77."""
    from transformers import CLIPTokenizer

    chars = _byte_alphabet()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [("a", "t</w>"), ("c", "at</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = 77
    return tok


def _clip_encoder(tok: Any, hidden: int, with_projection: bool = False, projection_dim: int = 32) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = tok.get_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=2,
        num_hidden_layers=2,
        projection_dim=projection_dim,
        hidden_act="gelu",
    )
    model = CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)
    return model.eval()


def _embeds(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _sd() -> tuple[Any, dict[str, Any]]:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
    )
    tok = clip_tokenizer()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=_clip_encoder(tok, 8),
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    return pipe, {"prompt": "a cat", "height": 16, "width": 16}


def _sdxl() -> tuple[Any, dict[str, Any]]:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 16,  # 6 time ids + pooled text embedding
        cross_attention_dim=24,  # text_encoder (8) and text_encoder_2 (16) hidden states, concatenated
        norm_num_groups=1,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
    )
    tok = clip_tokenizer()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=_clip_encoder(tok, 8),
        text_encoder_2=_clip_encoder(tok, 16, with_projection=True, projection_dim=16),
        tokenizer=tok,
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
    )
    return pipe, {"prompt": "a cat", "height": 16, "width": 16}


def _sd3() -> tuple[Any, dict[str, Any]]:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(4, 8),
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    gen = torch.Generator().manual_seed(1)
    kwargs = {
        "prompt_embeds": _embeds(gen, 1, 6, 32),
        "negative_prompt_embeds": _embeds(gen, 1, 6, 32),
        "pooled_prompt_embeds": _embeds(gen, 1, 64),
        "negative_pooled_prompt_embeds": _embeds(gen, 1, 64),
        "height": 16,
        "width": 16,
    }
    return pipe, kwargs


def _cogvideox() -> tuple[Any, dict[str, Any]]:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=1,
        sample_width=2,
        sample_height=2,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
    )
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    # CogVideoX's own scheduler family: v-prediction on a zero-terminal-SNR scaled-linear schedule
    scheduler = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        clip_sample=False,
        timestep_spacing="trailing",
    )
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
    gen = torch.Generator().manual_seed(2)
    kwargs = {
        "prompt_embeds": _embeds(gen, 1, 16, 32),
        "negative_prompt_embeds": _embeds(gen, 1, 16, 32),
        "height": 16,
        "width": 16,
        "num_frames": 9,
    }
    return pipe, kwargs


def _wan() -> tuple[Any, dict[str, Any]]:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
    gen = torch.Generator().manual_seed(3)
    kwargs = {
        "prompt_embeds": _embeds(gen, 1, 16, 32),
        "negative_prompt_embeds": _embeds(gen, 1, 16, 32),
        "height": 16,
        "width": 16,
        "num_frames": 5,
    }
    return pipe, kwargs


def _modelscope() -> tuple[Any, dict[str, Any]]:
    from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel

    torch.manual_seed(0)
    unet = UNet3DConditionModel(
        block_out_channels=(8, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
    )
    tok = clip_tokenizer()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = TextToVideoSDPipeline(
        vae=vae, text_encoder=_clip_encoder(tok, 8), tokenizer=tok, unet=unet, scheduler=scheduler
    )
    return pipe, {"prompt": "a cat", "height": 8, "width": 8, "num_frames": 3}


_BUILDERS = {
    "sd": _sd,
    "sdxl": _sdxl,
    "sd3": _sd3,
    "cogvideox": _cogvideox,
    "wan": _wan,
    "modelscope": _modelscope,
}


def tiny_pipeline(family: str) -> tuple[Any, dict[str, Any]]:
    """A tiny random pipeline of ``family`` (one of :data:`TINY_FAMILIES`) and the call kwargs it needs.

    The kwargs hold the prompt (or seeded prompt embeddings where the tiny pipeline has no text
    encoder) and a small resolution / frame count; add ``num_inference_steps``, ``generator`` and
    ``output_type`` yourself. Weights are seeded, so two calls build identical pipelines.
    """
    if family not in _BUILDERS:
        raise ConfigError(f"family: expected one of {', '.join(TINY_FAMILIES)}, got {family!r}")
    pipe, kwargs = _BUILDERS[family]()
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs
