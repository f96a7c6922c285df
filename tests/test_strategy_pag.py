"""PAG (perturbed-attention guidance) through the diffusers backend's attention processors.

* Equals diffusers' ``StableDiffusionPAGPipeline`` with the same applied layers (with and without CFG), where
  plain CFG is far from it; 3 NFE per step with CFG, 2 without.
* ``scale = 0`` is the inner strategy; the processors are restored after every forward; a selector that
  matches no layer, and a backend that cannot perturb, are named errors.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import guidekit as gk

pytest.importorskip("diffusers")
from diffusers import StableDiffusionPAGPipeline

from guidekit.integrations.diffusers import generate
from guidekit.integrations.diffusers.tiny import tiny_pipeline

pytestmark = pytest.mark.diffusers
STEPS = 4


@pytest.fixture(scope="module")
def pipes() -> tuple[Any, Any, dict[str, Any]]:
    pipe, kw = tiny_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    pag = StableDiffusionPAGPipeline(**pipe.components, pag_applied_layers=["mid"])
    pag.set_progress_bar_config(disable=True)
    return pipe, pag, kw


def latents() -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize(("w", "s", "nfe"), [(4.5, 2.0, 3 * STEPS), (1.0, 3.0, 2 * STEPS)])
def test_pag_equals_the_diffusers_pag_pipeline(pipes, w, s, nfe):
    pipe, pag, kw = pipes
    common = dict(kw, num_inference_steps=STEPS, output_type="latent")
    theirs = pag(**common, guidance_scale=w, pag_scale=s, latents=latents()).images
    ours, info = generate(pipe, gk.PAG(gk.CFG(w), scale=s), **common, latents=latents(), return_info=True)
    plain = generate(pipe, gk.CFG(w), **common, latents=latents()).images
    scale = float(theirs.abs().max())
    assert float((ours.images - theirs).abs().max()) < 1e-6 * scale  # float32 rounding of a different batching
    assert float((plain - theirs).abs().max()) > 1e-3 * scale  # the perturbation matters
    assert info.nfe == nfe


def test_pag_scale_zero_is_the_inner_strategy_and_processors_are_restored(pipes):
    pipe, _, kw = pipes
    before = dict(pipe.unet.attn_processors)
    common = dict(kw, num_inference_steps=STEPS, output_type="latent")
    zero = generate(pipe, gk.PAG(gk.CFG(3.0), scale=0.0), **common, latents=latents()).images
    assert torch.equal(zero, generate(pipe, gk.CFG(3.0), **common, latents=latents()).images)
    generate(pipe, gk.PAG(gk.CFG(3.0)), **common, latents=latents())
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}


def test_a_selector_that_matches_nothing_names_the_layers(pipes):
    pipe, _, kw = pipes
    with pytest.raises(gk.ConfigError, match=r"layer selector 'nowhere' matches no self-attention layer.*mid_block"):
        generate(pipe, gk.PAG(layers=("nowhere",)), num_inference_steps=2, output_type="latent", **kw)


def test_a_backend_that_cannot_perturb_names_what_it_supports():
    from guidekit.oracle import GaussianMixture

    gm = GaussianMixture.random(num_classes=2, components=1, event_shape=(1, 2, 2), seed=0)
    with pytest.raises(gk.ConfigError, match=r"NativeBackend supports \['none'\], got 'identity-self-attention'"):
        gk.sample(gm.as_model("edm"), torch.randn(2, 1, 2, 2), prediction="edm", steps=2, strategy=gk.PAG(),
                  cond=torch.tensor([0, 1]), uncond=torch.full((2,), -1))  # fmt: skip
