"""Perturbation guidance through the Guidekit Guider, as ComfyUI model patches, against ComfyUI's own nodes.

* PAG on the tiny SD1.5 U-net equals ComfyUI's PerturbedAttentionGuidance node (middle block, with CFG),
  bit for bit; the perturbed branch is one more ``calc_cond_batch`` of the positive conditioning.
* SLG on the tiny Wan 2.1 DiT equals ComfyUI's SkipLayerGuidanceDiT node over the whole schedule; STG-R is
  SLG then the rescale.
* SEG changes the result, scale 0 is the inner strategy, the model's patches are untouched afterwards, and a
  selector that matches nothing, block skipping on a U-net and identity attention on a DiT are named errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from comfyui_harness import Tiny, import_comfy, noise, one_thread, require, schedule, tiny_model, tiny_video

import guidekit as gk
from guidekit.errors import ConfigError

require()

WAN_SIGMAS = torch.tensor([0.9, 0.7, 0.45, 0.2, 0.0])


@pytest.fixture(scope="module")
def tiny() -> Iterator[Tiny]:
    import_comfy()
    with one_thread():
        yield tiny_model()


@pytest.fixture(scope="module")
def video() -> Iterator[Tiny]:
    import_comfy()
    with one_thread():
        yield tiny_video()


def _sample(guider: Any, tiny: Tiny, n: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    import comfy.samplers

    guider.set_conds(tiny.positive, tiny.negative)
    return guider.sample(n, torch.zeros_like(n), comfy.samplers.sampler_object("euler"), sigmas, disable_pbar=True)


def _ours(tiny: Tiny, strategy: gk.GuidanceStrategy, n: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, Any]:
    from guidekit_comfyui.guider import GuidekitComfyGuider

    guider = GuidekitComfyGuider(tiny.patcher, strategy)
    return _sample(guider, tiny, n, sigmas), guider


def _theirs(patcher: Any, tiny: Tiny, cfg: float, n: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_cfg(cfg)
    return _sample(guider, tiny, n, sigmas)


def _node_model(node: Any, *args: Any, **kwargs: Any) -> Any:
    return node.execute(*args, **kwargs).result[0]


def _video_noise() -> torch.Tensor:
    return torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(3))


def test_pag_equals_comfyuis_pag_node(tiny: Tiny) -> None:
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    n, sigmas = noise(), schedule()
    ours, guider = _ours(tiny, gk.PAG(gk.CFG(3.0), 2.0, ("mid",)), n, sigmas)
    theirs = _theirs(_node_model(PerturbedAttentionGuidance, tiny.patcher, 2.0), tiny, 3.0, n, sigmas)
    plain = _theirs(tiny.patcher, tiny, 3.0, n, sigmas)
    assert torch.equal(ours, theirs), float((ours - theirs).abs().max())
    assert float((plain - theirs).abs().max()) > 1e-3
    assert guider.backend.calls[:2] == [("cond", "uncond"), ("perturbed",)]
    assert "patches_replace" not in tiny.patcher.model_options.get("transformer_options", {})


def test_slg_equals_comfyuis_skip_layer_guidance_dit_node(video: Tiny) -> None:
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiT

    n = _video_noise()
    ours, _ = _ours(video, gk.SLG(gk.CFG(3.0), 2.0, ("double_block.1",)), n, WAN_SIGMAS)
    node = _node_model(
        SkipLayerGuidanceDiT, video.patcher, 2.0, 0.0, 1.0, double_layers="1", single_layers="", rescaling_scale=0.0
    )
    theirs = _theirs(node, video, 3.0, n, WAN_SIGMAS)
    plain = _theirs(video.patcher, video, 3.0, n, WAN_SIGMAS)
    scale = float(theirs.abs().max())
    assert float((ours - theirs).abs().max()) < 1e-5 * scale
    assert float((plain - theirs).abs().max()) > 1e-3 * scale
    stg, _ = _ours(video, gk.STG(gk.CFG(3.0), 2.0, ("double_block.1",), rescale=0.7), n, WAN_SIGMAS)
    rescaled, _ = _ours(video, gk.Rescale(gk.SLG(gk.CFG(3.0), 2.0, ("double_block.1",)), 0.7), n, WAN_SIGMAS)
    assert torch.equal(stg, rescaled)


def test_seg_patches_the_selected_self_attention_with_blurred_queries(tiny: Tiny) -> None:
    from guidekit_comfyui.perturb import with_perturbation

    from guidekit.perturbations import BlurredQueries

    options = with_perturbation({}, BlurredQueries(("mid",)), tiny.patcher.model.diffusion_model)
    patches = options["transformer_options"]["patches_replace"]["attn1"]
    assert list(patches) == [("middle", 0, 0)]
    q, k, v = (torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    out = patches["middle", 0, 0](q, k, v, {"n_heads": 2})
    assert torch.allclose(out, out[:, :1].expand_as(out), atol=1e-6)  # infinite blur: one output for all tokens
    assert not torch.allclose(out[:, :1], v[:, :1], atol=1e-3)
    n, sigmas = noise(), schedule()
    seg, guider = _ours(tiny, gk.SEG(gk.CFG(3.0), 3.0, ("mid", "output")), n, sigmas)
    assert guider.backend.calls[:2] == [("cond", "uncond"), ("perturbed",)]
    assert not torch.equal(seg, _ours(tiny, gk.CFG(3.0), n, sigmas)[0])


def test_scale_zero_is_the_inner_strategy(tiny: Tiny) -> None:
    n, sigmas = noise(), schedule()
    plain, _ = _ours(tiny, gk.CFG(3.0), n, sigmas)
    zero, guider = _ours(tiny, gk.PAG(gk.CFG(3.0), 0.0, ("mid",)), n, sigmas)
    assert torch.equal(zero, plain)
    assert all(call == ("cond", "uncond") for call in guider.backend.calls)


def test_bad_selectors_and_unsupported_places_are_named(tiny: Tiny, video: Tiny) -> None:
    n, sigmas = noise(), schedule()
    with pytest.raises(ConfigError, match=r"'nowhere' matches no self-attention layer.*middle\.0\.0"):
        _ours(tiny, gk.PAG(gk.CFG(3.0), 2.0, ("nowhere",)), n, sigmas)
    with pytest.raises(ConfigError, match=r"'skip-blocks' needs a DiT"):
        _ours(tiny, gk.SLG(gk.CFG(3.0), 2.0, ("middle.0",)), n, sigmas)
    with pytest.raises(ConfigError, match=r"replaces U-net self-attention.*use block skipping"):
        _ours(video, gk.STG(gk.CFG(3.0), 1.0, ("double_block.1",), mode="A"), _video_noise(), WAN_SIGMAS)
