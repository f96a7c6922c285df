"""S-CFG (semantic-aware CFG): per-region scales from the forward's attention maps.

* Native backend (``nn.MultiheadAttention`` self + cross attention, float32 and float64): the guided prediction
  equals the official ``get_mask`` + rate code written out here step by step from the module's own attention
  weights (self-attention refinement, token argmax, foreground from the unconditional forward, per-region
  rate, clamp, smoothing); no extra forward (2 NFE a step); scale 1 is the conditional prediction.
* The rate map lies in ``[min(low, cap/w), min(high, cap/w)]``; one region covering the foreground gives
  rate 1 (CFG); equal predictions give the conditional one.
* A layer selection without cross-attention is refused by name; through a tiny SD pipeline it runs on the
  UNet's ``attn1``/``attn2`` maps, differs from CFG and leaves no hooks behind.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attention_models import NULL, TOKENS, TinyAttentionNet

import guidekit as gk
from guidekit.ops.attention import region_rates

INFO = gk.samplers.StepInfo(0, 1, torch.tensor([3.0, 0.0], dtype=torch.float64))


def _smooth(t: torch.Tensor) -> torch.Tensor:
    """The official GaussianSmoothing(channels=1, kernel_size=3, sigma=0.5) after a reflect pad of 1."""
    mgrid = torch.arange(3, dtype=t.dtype)
    k = 1 / (0.5 * (2 * torch.pi) ** 0.5) * torch.exp(-(((mgrid - 1) / (2 * 0.5)) ** 2))
    kernel = torch.outer(k, k)
    kernel = kernel / kernel.sum()
    b, c = t.shape[:2]
    flat = F.pad(t.reshape(b * c, 1, *t.shape[2:]), (1, 1, 1, 1), mode="reflect")
    return F.conv2d(flat, kernel[None, None]).reshape(t.shape)


def _maps(model: TinyAttentionNet, x, sigma, labels):
    seen = {}

    def grab(name):
        def hook(m, args, out):
            seen[name] = type(m).forward(m, args[0], args[1], args[2], need_weights=True)[1]

        return hook

    handles = [model.mid.self_attn.register_forward_hook(grab("self")),
               model.up1.cross_attn.register_forward_hook(grab("cross"))]  # fmt: skip
    model(x, sigma, labels)
    for h in handles:
        h.remove()
    return seen["self"], seen["cross"]


def _official(model, x, sigma, cond, uncond, w):
    """sd/utils.py get_mask (one resolution: R = 1 here) and the rate of sd/sd.py, written out."""
    b = x.shape[0]
    ca_parts, fore_parts = [], []
    for labels in (uncond, cond):  # the official batch is [uncond; cond]
        sa, ca = _maps(model, x, sigma, labels)
        curr = sa.clone()
        for _ in range(3):
            curr = curr + sa @ sa
        sa_s = curr / 4
        a = (sa_s @ ca).transpose(1, 2).reshape(b, TOKENS, 8, 8)
        a = _smooth(a)
        ca_parts.append(a / (a.mean(dim=[2, 3], keepdim=True) + 1e-8))
        fore = torch.stack([a[:, 0], a[:, 1:].sum(1)], dim=1)
        fore_parts.append(fore / fore.mean(dim=[2, 3], keepdim=True))
    new_ca, fore_ca = ca_parts[1], fore_parts[0]
    ca_mask = (new_ca == new_ca.max(dim=1, keepdim=True).values).to(x.dtype)
    fore_mask = 1.0 - (fore_ca == fore_ca.max(dim=1, keepdim=True).values).to(x.dtype)[:, :1]
    sg = sigma.reshape(-1, 1, 1, 1)
    eps_c, eps_u = (x - model(x, sigma, cond)) / sg, (x - model(x, sigma, uncond)) / sg
    delta = eps_c - eps_u
    norm = delta.norm(dim=1, keepdim=True)
    region = (norm * ca_mask).sum([2, 3]) / (ca_mask.sum([2, 3]) + 1e-8)
    fore_n = (norm * fore_mask).sum([2, 3]) / (fore_mask.sum([2, 3]) + 1e-8)
    rate = fore_n * (ca_mask.sum([2, 3]) > 0).to(x.dtype) / (region + 1e-8)
    rate = (rate[..., None, None] * ca_mask).sum(dim=1, keepdim=True)
    rate = _smooth(torch.clamp_max(torch.clamp(rate, 0.8, 3.0), 15.0 / w))
    return x - sg * (eps_u + w * rate * delta), rate


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_scfg_equals_the_official_code_by_hand(dtype):
    model = TinyAttentionNet().to(dtype)
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(6), dtype=dtype) * 3.0
    sigma, cond, uncond = torch.full((2,), 3.0, dtype=dtype), torch.tensor([1, 2]), torch.tensor([NULL, NULL])
    w = 7.5
    with torch.no_grad():
        den = gk.guided(gk.samplers.EDMModel(model), gk.SCFG(w), cond, uncond, record_scales=True)
        ours = den(x, sigma, INFO)
        ref, rate = _official(model, x, sigma, cond, uncond, w)
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    assert ours.dtype == dtype and torch.allclose(ours, ref, atol=tol), float((ours - ref).abs().max())
    assert float(rate.max() - rate.min()) > 1e-3  # the regions get different scales
    assert den.nfe == 2 and den.forwards == 1  # the maps come from the [cond; uncond] forward itself
    record = den.records[0]
    assert record.scale_min is not None and 0.8 * w - 1e-4 <= record.scale_min <= record.scale_max <= 15.0 + 1e-4
    assert not model.mid.self_attn._forward_pre_hooks and not model.up1.cross_attn._forward_pre_hooks


def test_rate_bounds_single_region_and_equal_inputs():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    regions = F.one_hot(torch.randint(0, 5, (2, 8, 8), generator=g), 5).permute(0, 3, 1, 2).double()
    fore = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).double()
    for low, high, cap in ((0.8, 3.0, 15.0 / 7.5), (0.8, 3.0, 15.0 / 2.0), (0.8, 3.0, 0.5)):
        rate = region_rates(delta, regions, fore, low, high, cap)
        assert float(rate.min()) >= min(low, cap) - 1e-12 and float(rate.max()) <= min(high, cap) + 1e-12
    everywhere = torch.ones(2, 1, 8, 8, dtype=torch.float64)
    assert torch.allclose(region_rates(delta, everywhere, everywhere, 0.8, 3.0, 2.0), torch.ones_like(everywhere))
    model = TinyAttentionNet()
    x = torch.randn(1, 2, 8, 8, dtype=torch.float32)
    with torch.no_grad():
        same = gk.guided(gk.samplers.EDMModel(model), gk.SCFG(5.0), torch.tensor([1]), torch.tensor([1]))
        plain = gk.guided(gk.samplers.EDMModel(model), gk.CFG(1.0), torch.tensor([1]), None)
        assert torch.allclose(same(x, torch.ones(1), INFO), plain(x, torch.ones(1), INFO), atol=1e-6)


def test_scfg_scale_one_combinators_and_refusals():
    model = TinyAttentionNet()
    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(2)) * 20.0
    kw = dict(prediction="edm", steps=3, cond=torch.tensor([1]), uncond=torch.tensor([NULL]), progress=False)
    with torch.no_grad():
        assert torch.equal(
            gk.sample(model, x, strategy=gk.SCFG(1.0), **kw), gk.sample(model, x, strategy=gk.CFG(1.0), **kw)
        )
        scfg = gk.sample(model, x, strategy=gk.SCFG(4.0), **kw)
        assert not torch.allclose(scfg, gk.sample(model, x, strategy=gk.CFG(4.0), **kw), atol=1e-4)
        inside = gk.Interval(gk.SCFG(4.0), sigma_lo=0.0, sigma_hi=1e9)
        assert torch.equal(gk.sample(model, x, strategy=inside, **kw), scfg)
        rescaled = gk.sample(model, x, strategy=gk.Rescale(gk.SCFG(4.0), 0.7), **kw)
        assert torch.isfinite(rescaled).all() and not torch.allclose(rescaled, scfg, atol=1e-5)
        with pytest.raises(gk.ConfigError, match=r"layers: S-CFG needs cross-attention maps, the selected layers"):
            gk.sample(model, x, strategy=gk.SCFG(4.0, layers=("mid",)), **kw)


@pytest.mark.diffusers
def test_scfg_through_a_diffusers_pipeline():
    pytest.importorskip("diffusers")
    from guidekit.integrations.diffusers import generate
    from guidekit.integrations.diffusers.tiny import tiny_pipeline

    pipe, kw = tiny_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    common = dict(kw, num_inference_steps=3, output_type="latent")

    def latents() -> torch.Tensor:
        return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))

    ours, info = generate(pipe, gk.SCFG(4.5), **common, latents=latents(), return_info=True)
    cfg = generate(pipe, gk.CFG(4.5), **common, latents=latents()).images
    assert info.nfe == 6 and torch.isfinite(ours.images).all()
    assert float((ours.images - cfg).abs().max()) > 1e-3 * float(cfg.abs().max())
    assert all(not m._forward_pre_hooks for m in pipe.unet.modules())


@pytest.mark.diffusers
def test_joint_attention_models_are_refused_by_name():
    """SD3's joint attention has no separate cross-attention (NAG) and its maps mix image and text keys in
    one softmax (SAG, S-CFG): each is refused before any forward, naming the layers."""
    pytest.importorskip("diffusers")
    from guidekit.integrations.diffusers import generate
    from guidekit.integrations.diffusers.tiny import tiny_pipeline

    pipe, kw = tiny_pipeline("sd3")
    pipe.set_progress_bar_config(disable=True)
    common = dict(kw, num_inference_steps=2, output_type="latent")
    for strategy in (gk.SCFG(3.0), gk.SAG(gk.CFG(3.0), layers=("transformer_blocks.0",))):
        with pytest.raises(gk.ConfigError, match=r"observe: attention maps of joint-attention layers .*transformer_"):
            generate(pipe, strategy, **common)
    with pytest.raises(gk.ConfigError, match=r"'normalized-attention' acts on cross-attention layers .* has none"):
        generate(pipe, gk.NAG(), **common)


@pytest.mark.diffusers
def test_the_modular_guider_refuses_observers_by_name():
    """A modular pipeline's forwards record no attention maps: S-CFG is refused, not silently CFG."""
    pytest.importorskip("diffusers")
    from diffusers import EulerDiscreteScheduler

    from guidekit.integrations.diffusers import GuidekitGuider

    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    guider = GuidekitGuider(gk.SCFG(4.0), scheduler=scheduler)
    guider.set_state(0, 4, scheduler.timesteps[0])
    with pytest.raises(gk.ConfigError, match=r"modular guider runs batches .* without attention maps"):
        guider.prepare_inputs({"prompt_embeds": (torch.zeros(1), torch.ones(1))})


def test_a_backend_that_records_no_maps_is_refused_not_silently_cfg():
    """The engine holds every backend to the observers a plan asks for (a backend that ignores ``observe``, such
    as one written before the observer existed, would otherwise turn S-CFG into CFG without a word)."""
    from guidekit.engine import Backend, Engine, Position

    class Plain(Backend):
        def models(self):
            return frozenset({"main"})

        def prediction(self, model):
            return "eps"

        def forward(self, x, sigma, branches, conditions):
            return {b.name: x * 0.5 for b in branches}

    engine = Engine(gk.SCFG(4.0), Plain(), {})
    with pytest.raises(gk.ConfigError, match=r"backend: expected the attention maps branches \['cond', 'uncond'\]"):
        engine.evaluate(torch.ones(1, 2, 4, 4), torch.ones(1), Position(0, 1))
