"""Perturbations on every supported diffusers family: SD, SDXL, SD3, CogVideoX, Wan and ModelScope.

* PAG through the SD3 joint-attention processor equals diffusers' ``StableDiffusion3PAGPipeline`` (which the
  SD3 *modular* pipeline cannot run), with and without CFG.
* On every family, PAG on a self-attention layer, SLG on a block, and for the video families STG in both
  modes, run through ``generate`` with 3 NFE per step, change the result, leave no processor or forward
  behind, and at scale 0 equal the inner strategy bit for bit.
* The identity rule of each processor, as a property a wrong mask fails: a visual token's output does not
  depend on the other visual tokens, but does on the text (joint attention), and equals ``to_out(to_v(h))``
  where there is no text (Wan). The official CogVideoX STG-A mask (identity block on the first positions,
  which are text) fails the first property.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

import guidekit as gk

pytest.importorskip("diffusers")
from diffusers import StableDiffusion3PAGPipeline

from guidekit.integrations.diffusers import generate
from guidekit.integrations.diffusers.processors import (
    CogVideoXIdentityAttnProcessor,
    JointIdentityAttnProcessor,
    WanIdentityAttnProcessor,
    identity_processor,
)
from guidekit.integrations.diffusers.tiny import tiny_pipeline

pytestmark = pytest.mark.diffusers
STEPS = 2

# family -> (a self-attention selector, a block selector, video?)
FAMILIES: dict[str, tuple[str, str, bool]] = {
    "sd": ("mid", "mid_block.attentions.0.transformer_blocks.0", False),
    "sdxl": ("mid", "mid_block.attentions.0.transformer_blocks.0", False),
    "sd3": ("transformer_blocks.0.attn", "transformer_blocks.0", False),
    "cogvideox": ("transformer_blocks.0.attn1", "transformer_blocks.0", True),
    "wan": ("blocks.1.attn1", "blocks.1", True),
    "modelscope": ("mid_block.attentions", "mid_block.attentions.0.transformer_blocks.0", True),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> tuple[str, Any, dict[str, Any]]:
    pipe, kw = tiny_pipeline(request.param)
    return request.param, pipe, dict(kw, num_inference_steps=STEPS, output_type="latent")


def _denoiser(pipe: Any) -> torch.nn.Module:
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


def _run(pipe: Any, strategy: gk.GuidanceStrategy, kw: dict[str, Any]) -> tuple[torch.Tensor, int]:
    out, info = generate(pipe, strategy, **kw, generator=torch.Generator().manual_seed(3), return_info=True)
    result = out.images if hasattr(out, "images") else out.frames
    return torch.as_tensor(result), info.nfe


def test_every_perturbation_runs_on_every_family(family):
    name, pipe, kw = family
    attention, block, video = FAMILIES[name]
    model = _denoiser(pipe)
    processors = {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")}
    plain, _ = _run(pipe, gk.CFG(3.0), kw)
    strategies = [gk.PAG(gk.CFG(3.0), 2.0, (attention,)), gk.SLG(gk.CFG(3.0), 2.0, (block,))]
    if video:
        strategies += [gk.STG(gk.CFG(3.0), 1.0, (block,)), gk.STG(gk.CFG(3.0), 1.0, (attention,), mode="A")]
    for strategy in strategies:
        out, nfe = _run(pipe, strategy, kw)
        assert nfe == 3 * STEPS
        assert torch.isfinite(out).all()
        assert float((out - plain).abs().max()) > 1e-4, type(strategy).__name__
        zero, _ = _run(pipe, type(strategy)(**{**strategy.__dict__, "scale": 0.0}), kw)
        inner = gk.Rescale(gk.CFG(3.0), 0.7) if isinstance(strategy, gk.STG) else gk.CFG(3.0)
        assert torch.equal(zero, plain if inner == gk.CFG(3.0) else _run(pipe, inner, kw)[0])
    assert {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")} == processors
    assert not [n for n, m in model.named_modules() if "forward" in m.__dict__]


def test_pag_scale_zero_is_cfg_on_every_family(family):
    name, pipe, kw = family
    pag = gk.PAG(gk.CFG(3.0), 0.0, (FAMILIES[name][0],))
    assert torch.equal(_run(pipe, pag, kw)[0], _run(pipe, gk.CFG(3.0), kw)[0])


@pytest.mark.parametrize(("w", "s", "nfe"), [(4.5, 2.0, 3 * 4), (1.0, 3.0, 2 * 4)])
def test_pag_equals_the_sd3_pag_pipeline(w, s, nfe):
    pipe, kw = tiny_pipeline("sd3")
    accepted = inspect.signature(StableDiffusion3PAGPipeline.__init__).parameters
    theirs_pipe = StableDiffusion3PAGPipeline(
        **{k: v for k, v in pipe.components.items() if k in accepted}, pag_applied_layers=["blocks.0"]
    )
    theirs_pipe.set_progress_bar_config(disable=True)
    common = dict(kw, num_inference_steps=4, output_type="latent")

    def latents() -> torch.Tensor:
        return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))

    theirs = theirs_pipe(**common, guidance_scale=w, pag_scale=s, latents=latents()).images
    strategy = gk.PAG(gk.CFG(w), scale=s, layers=("transformer_blocks.0.attn",))
    ours, info = generate(pipe, strategy, **common, latents=latents(), return_info=True)
    plain = generate(pipe, gk.CFG(w), **common, latents=latents()).images
    scale = float(theirs.abs().max())
    assert float((ours.images - theirs).abs().max()) < 1e-6 * scale
    assert float((plain - theirs).abs().max()) > 1e-3 * scale
    assert info.nfe == nfe


def _attention(family: str) -> torch.nn.Module:
    pipe, _ = tiny_pipeline(family)
    model = _denoiser(pipe)
    return dict(model.named_modules())[FAMILIES[family][0]]


def _vary(x: torch.Tensor, token: int) -> torch.Tensor:
    y = x.clone()
    y[:, token] += torch.randn(y[:, token].shape, generator=torch.Generator().manual_seed(9))
    return y


@pytest.mark.parametrize(
    ("family", "processor"), [("sd3", JointIdentityAttnProcessor), ("cogvideox", CogVideoXIdentityAttnProcessor)]
)
def test_joint_identity_keeps_the_text_and_drops_the_other_visual_tokens(family, processor):
    attn = _attention(family)
    assert isinstance(identity_processor(attn), processor)
    gen = torch.Generator().manual_seed(0)
    dim = attn.to_q.in_features
    h, text = (
        torch.randn(2, 12, dim, generator=gen),
        torch.randn(2, 5, attn.add_q_proj.in_features if family == "sd3" else dim, generator=gen),
    )
    with torch.no_grad():
        video, _ = processor()(attn, h, text)
        other, _ = processor()(attn, _vary(h, 4), text)
        retexted, _ = processor()(attn, h, _vary(text, 2))
        full, _ = attn.processor(attn, h, text)
    keep = [i for i in range(12) if i != 4]
    assert torch.allclose(video[:, keep], other[:, keep], atol=1e-6)  # other visual tokens do not reach token i
    assert not torch.allclose(video[:, 4], other[:, 4], atol=1e-4)  # its own value does
    assert not torch.allclose(video, retexted, atol=1e-4)  # the text still does
    assert not torch.allclose(video, full, atol=1e-4)  # and it is not the unperturbed layer


def test_wan_identity_is_the_value_projection():
    attn = _attention("wan")
    assert isinstance(identity_processor(attn), WanIdentityAttnProcessor)
    h = torch.randn(2, 12, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(WanIdentityAttnProcessor()(attn, h), attn.to_out[0](attn.to_v(h)))


def test_an_unsupported_processor_is_named():
    pipe, _ = tiny_pipeline("sd")
    attn = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1
    attn.processor = object()
    with pytest.raises(gk.ConfigError, match=r"supports the attention processors .*AttnProcessor2_0.*uses object"):
        identity_processor(attn)


@pytest.mark.parametrize(
    "strategy",
    [
        gk.PAG(gk.CFG(4.0), 2.0, ("mid",)),
        gk.SEG(gk.CFG(4.0), 2.0, ("mid",)),
        gk.SLG(gk.CFG(4.0), 2.0, ("mid_block.attentions.0.transformer_blocks.0",)),
        gk.PAG(gk.CFG(1.0), 3.0, ("mid",)),
    ],
    ids=["pag", "seg", "slg", "pag-without-cfg"],
)
def test_the_modular_guider_runs_perturbed_batches_like_generate(strategy):
    """A modular denoise block's protocol (prepare_inputs, prepare_models / cleanup_models around each batch's
    forward, the guider's call) with the guider applying the perturbation equals ``generate``."""
    from guidekit.integrations.diffusers import GuidekitGuider

    pipe, kw = tiny_pipeline("sd")
    steps, latents = 3, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = generate(
        pipe, strategy, num_inference_steps=steps, latents=latents.clone(), negative_prompt="", output_type="latent",
        **kw,
    ).images  # fmt: skip
    cond, uncond = pipe.encode_prompt(kw["prompt"], "cpu", 1, True, negative_prompt="")
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    guider = GuidekitGuider(strategy, scheduler=scheduler)
    processors = dict(pipe.unet.attn_processors)
    x, sizes = latents.clone() * scheduler.init_noise_sigma, []
    with torch.no_grad():  # a pipeline runs its loop without gradients
        for i, t in enumerate(scheduler.timesteps):
            guider.set_state(i, steps, t)
            batches = guider.prepare_inputs({"prompt_embeds": (cond, uncond)})
            for batch in batches:
                guider.prepare_models(pipe.unet)
                batch.noise_pred = pipe.unet(x, t, encoder_hidden_states=batch.prompt_embeds, return_dict=False)[0]
                guider.cleanup_models(pipe.unet)
            sizes.append(len(batches))
            x = scheduler.step(guider(batches).pred, t, x, return_dict=False)[0]
    assert sizes == [3 if strategy.inner != gk.CFG(1.0) else 2] * steps
    assert float((ours - x).abs().max()) < 1e-5 * float(x.abs().max())  # batch 1 vs 2: float32 rounding only
    assert (
        float(
            (
                ours
                - generate(
                    pipe,
                    strategy.inner,
                    num_inference_steps=steps,
                    latents=latents.clone(),
                    negative_prompt="",
                    output_type="latent",
                    **kw,
                ).images
            )
            .abs()
            .max()
        )
        > 1e-3
    )
    assert dict(pipe.unet.attn_processors) == processors
    assert not [n for n, m in pipe.unet.named_modules() if "forward" in m.__dict__]


def test_the_modular_guider_refuses_nag_by_name():
    from diffusers import EulerDiscreteScheduler

    from guidekit.integrations.diffusers import GuidekitGuider

    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    guider = GuidekitGuider(gk.NAG(), scheduler=scheduler)
    guider.set_state(0, 4, scheduler.timesteps[0])
    with pytest.raises(gk.ConfigError, match="modular guider runs batches"):
        guider.prepare_inputs({"prompt_embeds": (torch.zeros(1), torch.ones(1))})


class _DiffusersBuilt(torch.nn.Module):
    """A native ``model(x, sigma, labels)`` built from diffusers' ``Attention`` (no pipeline)."""

    def __init__(self) -> None:
        from diffusers.models.attention_processor import Attention

        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out = torch.nn.Conv2d(2, 16, 3, padding=1), torch.nn.Conv2d(16, 2, 3, padding=1)
        self.label = torch.nn.Embedding(11, 16)
        self.mid = torch.nn.Module()
        self.mid.attn1 = Attention(16, heads=2, dim_head=8)

    def tokens(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.inp(x / (sigma.reshape(-1, 1, 1, 1) ** 2 + 1).sqrt()) + self.label(labels)[..., None, None]
        return h.flatten(2).transpose(1, 2)

    def finish(self, x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = sigma.reshape(-1, 1, 1, 1)
        return x / (s**2 + 1) + s / (s**2 + 1).sqrt() * self.out(
            t.transpose(1, 2).reshape(x.shape[0], 16, *x.shape[2:])
        )

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x, sigma, labels)
        return self.finish(x, sigma, t + self.mid.attn1(t))


def test_the_native_backend_perturbs_diffusers_attention_modules():
    """A native model built from diffusers blocks is perturbed through diffusers' family (registered on import):
    PAG's branch equals the model with that attention's output ``to_out(to_v(h))``, and the processor is back."""
    from guidekit.engine import NativeBackend
    from guidekit.perturbations import IdentitySelfAttention

    model = _DiffusersBuilt()
    gen = torch.Generator().manual_seed(1)
    x, sigma, labels = torch.randn(2, 2, 4, 4, generator=gen), torch.tensor([2.0, 0.5]), torch.tensor([3, 7])
    processor = model.mid.attn1.processor
    backend = NativeBackend({"main": gk.samplers.EDMModel(model)})
    branch = gk.Branch("perturbed", perturbation=IdentitySelfAttention(("mid",)))
    with torch.no_grad():
        perturbed = backend.forward(x, sigma, [branch], {"cond": labels})["perturbed"]
        t = model.tokens(x, sigma, labels)
        expected = model.finish(x, sigma, t + model.mid.attn1.to_out[0](model.mid.attn1.to_v(t)))
        plain = model(x, sigma, labels)
    assert torch.allclose(perturbed, expected, atol=1e-6)
    assert not torch.allclose(perturbed, plain, atol=1e-4)
    assert model.mid.attn1.processor is processor  # put back
    denoiser = gk.guided(
        gk.samplers.EDMModel(model), gk.PAG(gk.CFG(3.0), 2.0, ("mid",)), labels, torch.tensor([10, 10])
    )
    with torch.no_grad():
        denoiser(x, sigma, gk.samplers.StepInfo(0, 1, torch.tensor([2.0, 0.0], dtype=torch.float64)))
    assert denoiser.nfe == 3
