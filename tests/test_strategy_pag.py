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


def test_a_native_model_that_is_not_a_module_cannot_be_perturbed():
    from guidekit.oracle import GaussianMixture

    gm = GaussianMixture.random(num_classes=2, components=1, event_shape=(1, 2, 2), seed=0)
    with pytest.raises(gk.ConfigError, match=r"model: expected a torch.nn.Module to apply the 'identity-self-"):
        gk.sample(gm.as_model("edm"), torch.randn(2, 1, 2, 2), prediction="edm", steps=2, strategy=gk.PAG(),
                  cond=torch.tensor([0, 1]), uncond=torch.full((2,), -1))  # fmt: skip


# -- the native backend: guidekit's own video model (space-time attention) -------------------------------------
def test_native_pag_on_the_video_model_perturbs_exactly_the_selected_attention():
    """The perturbed prediction equals the model with its attention replaced by ``out_proj(v_proj(h))`` by hand;
    the attention module is restored after every forward; 3 NFE per step with CFG."""
    import copy

    from guidekit.zoo.video import load_denoiser

    torch.manual_seed(0)
    model = load_denoiser()
    x, sigma, labels = torch.randn(2, 1, 8, 16, 16) * 2.0, torch.full((2,), 2.0), torch.tensor([3, 7])
    adapter = gk.samplers.EDMModel(model, prediction="x0", layout="b c f h w")
    den = gk.guided(adapter, gk.PAG(gk.CFG(1.0), scale=1.0, layers=("attn",)), labels, None)
    info = gk.samplers.StepInfo(0, 1, torch.tensor([2.0, 0.0], dtype=torch.float64))
    with torch.no_grad():
        guided = den(x, sigma, info)  # c + (c - p)
        cond = model(x, sigma, labels)
        by_hand = copy.deepcopy(model)
        attn = by_hand.net.attn.attn
        e = attn.embed_dim
        attn.forward = lambda q, k, v, **kw: (
            attn.out_proj(v @ attn.in_proj_weight[2 * e :].T + attn.in_proj_bias[2 * e :]),
            None,
        )
        perturbed = by_hand(x, sigma, labels)
    assert torch.allclose(2 * cond - guided, perturbed, atol=1e-5), float((2 * cond - guided - perturbed).abs().max())
    assert not torch.allclose(perturbed, cond, atol=1e-3)  # the identity attention changes the prediction
    assert "forward" not in model.net.attn.attn.__dict__
    records: list[gk.StepRecord] = []
    gk.sample(model, torch.randn(1, 1, 8, 16, 16) * 80.0, prediction="edm", layout="b c f h w", steps=3,
              strategy=gk.PAG(gk.CFG(3.0), layers=("attn",)), cond=torch.tensor([3]),
              uncond=torch.tensor([model.null_label]), callback=records.append, progress=False)  # fmt: skip
    assert records[-1].nfe == 9 and records[0].branches == ("cond", "uncond", "perturbed")


def test_native_slg_skips_a_residual_block_and_a_bad_selector_names_the_modules():
    from guidekit.zoo.video import load_denoiser

    model = load_denoiser()
    kw = dict(prediction="edm", layout="b c f h w", steps=2, cond=torch.tensor([3]), progress=False)
    x = torch.randn(1, 1, 8, 16, 16, generator=torch.Generator().manual_seed(0)) * 80.0
    skipped = gk.sample(model, x, strategy=gk.SLG(gk.CFG(1.0), scale=1.0, layers=("net.mid2",)), **kw)
    assert not torch.equal(skipped, gk.sample(model, x, strategy=gk.CFG(1.0), **kw))
    with pytest.raises(gk.ConfigError, match=r"layer selector 'nowhere' matches no module of VideoDenoiser.*net\.mid2"):
        gk.sample(model, x, strategy=gk.SLG(gk.CFG(1.0), layers=("nowhere",)), **kw)


@pytest.mark.parametrize("kind", ["identity", "blur"])
def test_native_self_attention_perturbations_leave_cross_attention_calls_unchanged(kind):
    """A selector that picks both attentions of a block (``"attn"`` here, PAG's ``"mid"`` on a U-net with
    both) perturbs the self-attention call only: a cross-attention call (key not the query) runs as it is."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from attention_models import TinyAttentionNet

    from guidekit.engine.perturb import applied
    from guidekit.perturbations import BlurredQueries, IdentitySelfAttention

    model = TinyAttentionNet()
    gen = torch.Generator().manual_seed(0)
    x, sigma, labels = torch.randn(2, 2, 8, 8, generator=gen), torch.tensor([1.0, 2.0]), torch.tensor([1, 3])
    both = IdentitySelfAttention(("attn",)) if kind == "identity" else BlurredQueries(("attn",))
    only_self = IdentitySelfAttention(("self_attn",)) if kind == "identity" else BlurredQueries(("self_attn",))
    with torch.no_grad():
        with applied(model, both):
            picked_both = model(x, sigma, labels)
        with applied(model, only_self):
            picked_self = model(x, sigma, labels)
        plain = model(x, sigma, labels)
    assert torch.equal(picked_both, picked_self)
    assert not torch.allclose(picked_self, plain, atol=1e-5)
