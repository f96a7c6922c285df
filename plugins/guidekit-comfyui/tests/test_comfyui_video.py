"""5D video latents in ComfyUI's layout ``(b, c, t, h, w)`` on a flow model (a tiny Wan 2.1 DiT).

ComfyUI's flow coordinates (``x = (1 - t) x0 + t n``, sigma ``t``) are converted to EDM by the guider; on Euler
(the same update in both coordinates) the guider equals guidekit's native engine and Euler sampler run in EDM
coordinates on the same model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from comfyui_harness import Tiny, example, import_comfy, one_thread, require, tiny_video, why_not

import guidekit as gk
from guidekit.registry import SAMPLERS, STRATEGIES
from guidekit.samplers import EDMModel

require()

SIGMAS = torch.tensor([0.9, 0.7, 0.45, 0.2, 0.0])
"""Flow times (ComfyUI's sigmas for a flow model), below t = 1 so that EDM sigma stays finite."""


@pytest.fixture(scope="module")
def video() -> Iterator[Tiny]:
    import_comfy()
    with one_thread():
        yield tiny_video()


def _noise() -> torch.Tensor:
    return torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(3))


def _sample(guider: Any, tiny: Tiny) -> torch.Tensor:
    import comfy.samplers

    n = _noise()
    guider.set_conds(tiny.positive, tiny.negative)
    return guider.sample(n, torch.zeros_like(n), comfy.samplers.sampler_object("euler"), SIGMAS, disable_pbar=True)


def _native(tiny: Tiny, strategy: gk.GuidanceStrategy) -> tuple[torch.Tensor, Any]:
    model = tiny.patcher.model

    def x0(x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        t = sigma / (1 + sigma)  # EDM -> flow time, x_flow = x_edm / (1 + sigma)
        return model.apply_model(x / (1 + sigma).reshape(-1, 1, 1, 1, 1).to(x.dtype), t.to(x.dtype), c_crossattn=cond)

    adapter = EDMModel(x0, prediction="x0", layout="b c f h w")
    sigmas = SIGMAS.double() / (1 - SIGMAS.double())
    denoiser = gk.guided(adapter, strategy, tiny.cond, tiny.uncond)
    x_T = _noise() * SIGMAS[0] / (1 - SIGMAS[0])
    return model.process_latent_out(SAMPLERS.get("euler")(denoiser, x_T, sigmas)), denoiser


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / float(b.abs().max())


def test_cfg_on_a_video_flow_model_matches_comfyui_cfg_guider(video: Tiny) -> None:
    import comfy.samplers
    from guidekit_comfyui.guider import GuidekitComfyGuider

    theirs = comfy.samplers.CFGGuider(video.patcher)
    theirs.set_cfg(3.0)
    ours = _sample(GuidekitComfyGuider(video.patcher, gk.CFG(3.0)), video)
    assert ours.shape == (1, 16, 2, 4, 4)
    assert _rel(ours, _sample(theirs, video)) < 1e-5  # x / (1 - t) round trip: float tolerance, not bit-exact


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_strategy_on_5d_latents_equals_the_native_engine(video: Tiny, name: str) -> None:
    from guidekit_comfyui.guider import GuidekitComfyGuider

    strategy, why = example(name), why_not(name)
    if why is not None:
        where = {"perturbation": "test_comfyui_perturbations runs it", "condition": "the guider runs its unknown row"}
        where = where.get(why, "test_comfyui_guider refuses it")
        pytest.skip(f"{name}: {why}; the native engine here cannot run it ({where})")
    guider = GuidekitComfyGuider(video.patcher, strategy)
    ours = _sample(guider, video)
    native, denoiser = _native(video, strategy)
    assert _rel(ours, native) < 2e-5, name
    assert guider.engine.nfe == denoiser.nfe


def test_a_percent_window_on_a_flow_schedule_guides_the_same_steps(video: Tiny) -> None:
    """The window resolves on the schedule converted to EDM sigma, where the engine decides (t = 0.9 -> 9)."""
    from guidekit_comfyui.guider import GuidekitComfyGuider, edm_sigmas
    from guidekit_comfyui.nodes import IntervalPercentNode, strategy_node

    (cfg,) = strategy_node("cfg")().make(scale=3.0)
    (window,) = IntervalPercentNode().make(cfg, 0.25, 0.75)
    guider = GuidekitComfyGuider(video.patcher, window)
    ours = _sample(guider, video)
    assert [r.uncond_used for r in guider.engine.records] == [False, True, True, False]
    sigmas = edm_sigmas(video.patcher.model.model_sampling, SIGMAS)
    native, _ = _native(video, gk.Interval.from_fractions(gk.CFG(3.0), 0.25, 0.75, sigmas))
    assert _rel(ours, native) < 2e-5
