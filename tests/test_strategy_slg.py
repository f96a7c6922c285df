"""SLG (skip-layer guidance) through the diffusers backend: whole transformer blocks skipped for one forward.

* Equals the SD3 pipeline's own ``skip_guidance_layers`` rule over every step, where plain CFG is far from it.
* The SD3 pipeline's window is strict on both ends (4 steps with (0.25, 0.75) guide step 2 only);
  ``Interval.from_fractions`` keeps ``int(start·N) <= i < int(stop·N)`` (steps 1 and 2), as documented.
* A block selector that matches nothing names the blocks there are; blocks are restored after each forward.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import guidekit as gk

pytest.importorskip("diffusers")
from guidekit.integrations.diffusers import generate
from guidekit.integrations.diffusers.families import noise_schedule
from guidekit.integrations.diffusers.tiny import tiny_pipeline

pytestmark = pytest.mark.diffusers
STEPS = 4


@pytest.fixture(scope="module")
def sd3() -> tuple[Any, dict[str, Any]]:
    pipe, kw = tiny_pipeline("sd3")
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(kw, num_inference_steps=STEPS, output_type="latent")


def latents() -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))


def test_slg_equals_the_sd3_pipeline_skip_guidance_layers(sd3):
    pipe, common = sd3
    window = dict(skip_layer_guidance_start=-1.0, skip_layer_guidance_stop=2.0)  # every step (its test is strict)
    theirs = pipe(
        **common,
        guidance_scale=4.5,
        skip_guidance_layers=[0],
        skip_layer_guidance_scale=2.0,
        latents=latents(),
        **window,
    ).images
    strategy = gk.SLG(gk.CFG(4.5), scale=2.0, layers=("transformer_blocks.0",))
    ours, info = generate(pipe, strategy, **common, latents=latents(), return_info=True)
    plain = generate(pipe, gk.CFG(4.5), **common, latents=latents()).images
    scale = float(theirs.abs().max())
    assert float((ours.images - theirs).abs().max()) < 1e-6 * scale
    assert float((plain - theirs).abs().max()) > 1e-3 * scale
    assert info.nfe == 3 * STEPS
    assert "forward" not in pipe.transformer.transformer_blocks[0].__dict__  # the block is restored


def test_the_sd3_window_is_strict_and_from_fractions_is_not(sd3):
    pipe, common = sd3
    strategy = gk.SLG(gk.CFG(4.5), scale=2.0, layers=("transformer_blocks.0",))
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    windowed = gk.Interval.from_fractions(strategy, 0.25, 0.75, noise_schedule(scheduler))
    _, info = generate(pipe, windowed, **common, latents=latents(), return_info=True)
    assert [step for step, _, guided in info.steps if guided] == [1, 2]  # diffusers' strict test: step 2 only
    assert info.nfe == 1 + 3 + 3 + 1  # conditional only outside the window, [cond; uncond] + skipped inside


def test_a_block_selector_that_matches_nothing_names_the_blocks(sd3):
    pipe, common = sd3
    with pytest.raises(gk.ConfigError, match=r"matches no transformer block.*transformer_blocks\.0"):
        generate(pipe, gk.SLG(layers=("transformer_blocks.9",)), **common, latents=latents())
