"""SAG (self-attention guidance) and the attention observer it reads, and the engine's follow-up stage.

* Observer (native ``nn.MultiheadAttention``): the recorded map is the module's own head-averaged attention
  weights; the forward's output is bit-identical with and without it; hooks exist only while a plan observes
  (none at all for a plan that does not).
* SAG on the native backend (float32, float64) equals the rule computed by hand from the model (map, mask,
  blur written out as a 2-D convolution, re-noise, second forward); scale 0 is the inner strategy bit for
  bit; 3 NFE per step with CFG, 2 without; composes with Interval and Rescale.
* Through a tiny SD pipeline SAG equals diffusers' ``StableDiffusionSAGPipeline`` with and without CFG.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attention_models import NULL, TinyAttentionNet

import guidekit as gk

INFO = gk.samplers.StepInfo(0, 1, torch.tensor([3.0, 0.0], dtype=torch.float64))


def _inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3), dtype=dtype) * 3.0
    return x, torch.full((2,), 3.0, dtype=dtype), torch.tensor([0, 1]), torch.tensor([NULL, NULL])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_observer_records_the_modules_own_weights_and_changes_nothing(dtype):
    model = TinyAttentionNet().to(dtype)
    x, sigma, cond, _ = _inputs(dtype)
    attn = model.mid.self_attn
    seen: list[torch.Tensor] = []
    hooks_during: list[int] = []

    def probe(m, args, out):
        hooks_during.append(len(m._forward_pre_hooks))
        n = args[0]
        seen.append(type(m).forward(m, n, n, n, need_weights=True)[1])  # the module's own map (heads averaged)

    handle = attn.register_forward_hook(probe)
    from guidekit.engine import NativeBackend

    backend = NativeBackend({"main": gk.samplers.EDMModel(model)})
    observe = gk.AttentionMaps(("mid",), "self")
    with torch.no_grad():
        plain = backend.forward(x, sigma, [gk.COND], {"cond": cond})
        watched = backend.forward(x, sigma, [gk.Branch("cond", observe=observe)], {"cond": cond})
    handle.remove()
    assert hooks_during == [0, 1]  # no pre-hook on the plain forward, the observer's on the observed one
    assert torch.equal(plain["cond"], watched["cond"])
    amap = watched[gk.branch.observation_key("cond", "self:mid.self_attn")]
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert amap.shape == (2, 64, 64) and torch.allclose(amap, seen[1], atol=tol)
    assert len(attn._forward_pre_hooks) == 0
    with pytest.raises(gk.ConfigError, match=r"observe: layer selector 'nowhere' matches no self-attention layer \(nn"):
        backend.forward(x, sigma, [gk.Branch("cond", observe=gk.AttentionMaps(("nowhere",)))], {"cond": cond})


def _blur(x0: torch.Tensor) -> torch.Tensor:
    t = torch.arange(9, dtype=x0.dtype) - 4
    k = torch.exp(-0.5 * t**2)
    k2 = torch.outer(k, k) / k.sum() ** 2
    pad = F.pad(x0, (4, 4, 4, 4), mode="reflect")
    return F.conv2d(pad, k2.expand(x0.shape[1], 1, 9, 9).contiguous(), groups=x0.shape[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_sag_equals_the_rule_by_hand(dtype):
    model = TinyAttentionNet().to(dtype)
    x, sigma, cond, uncond = _inputs(dtype)
    w, s = 3.0, 0.75
    with torch.no_grad():
        den = gk.guided(gk.samplers.EDMModel(model), gk.SAG(gk.CFG(w), scale=s), cond, uncond)
        ours = den(x, sigma, INFO)
        sg = sigma.reshape(-1, 1, 1, 1)
        x0_c, x0_u = model(x, sigma, cond), model(x, sigma, uncond)
        eps_c, eps_u = (x - x0_c) / sg, (x - x0_u) / sg
        attn = model.mid.self_attn
        captured: list[torch.Tensor] = []
        handle = attn.register_forward_hook(
            lambda m, a, o: captured.append(type(m).forward(m, a[0], a[0], a[0], need_weights=True)[1])
        )
        model(x, sigma, uncond)
        handle.remove()
        mask = (captured[0].sum(1) > 1.0).to(dtype).reshape(2, 1, 8, 8)
        degraded = _blur(x0_u) * mask + x0_u * (1 - mask)
        x_tilde = degraded + sg * eps_u
        eps_p = (x_tilde - model(x_tilde, sigma, uncond)) / sg
        guided = eps_u + w * (eps_c - eps_u) + s * (eps_u - eps_p)
        ref = x - sg * guided
    assert 0 < float(mask.mean()) < 1  # the mask selects some tokens, not all
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    assert ours.dtype == dtype and torch.allclose(ours, ref, atol=tol), float((ours - ref).abs().max())
    assert den.nfe == 3 and den.forwards == 2  # [cond; uncond] observed, then the degraded uncond forward
    assert len(attn._forward_pre_hooks) == 0


def test_native_sag_scale_zero_nfe_and_combinators():
    model = TinyAttentionNet()
    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(4)) * 20.0
    kw = dict(prediction="edm", steps=3, cond=torch.tensor([2]), uncond=torch.tensor([NULL]), progress=False)
    with torch.no_grad():
        cfg = gk.sample(model, x, strategy=gk.CFG(3.0), **kw)
        assert torch.equal(gk.sample(model, x, strategy=gk.SAG(gk.CFG(3.0), scale=0.0), **kw), cfg)
        records: list[gk.StepRecord] = []
        sag = gk.sample(model, x, strategy=gk.SAG(gk.CFG(3.0)), callback=records.append, **kw)
        assert records[-1].nfe == 9 and records[0].branches == ("cond", "uncond", "sag")
        assert not torch.allclose(sag, cfg, atol=1e-4)
        records.clear()
        gk.sample(model, x, strategy=gk.SAG(gk.CFG(1.0)), callback=records.append, **kw)
        assert records[-1].nfe == 6 and records[0].branches == ("cond", "sag")  # the cond map without CFG
        inside = gk.Interval(gk.SAG(gk.CFG(3.0)), sigma_lo=0.0, sigma_hi=1e9)
        assert torch.equal(gk.sample(model, x, strategy=inside, **kw), sag)
        outside = gk.Interval(gk.SAG(gk.CFG(3.0)), sigma_lo=1e8, sigma_hi=1e9)
        assert torch.equal(gk.sample(model, x, strategy=outside, **kw), gk.sample(model, x, strategy=gk.CFG(1.0), **kw))
        rescaled = gk.sample(model, x, strategy=gk.Rescale(gk.SAG(gk.CFG(3.0)), 0.7), **kw)
        assert torch.isfinite(rescaled).all() and not torch.allclose(rescaled, sag, atol=1e-5)


def test_sag_refusals_name_what_is_wrong():
    model = TinyAttentionNet()
    kw = dict(prediction="edm", steps=2, cond=torch.tensor([2]), uncond=torch.tensor([NULL]), progress=False)
    with pytest.raises(gk.ConfigError, match=r"observe: the layers \[.up1.\] of TinyAttentionNet ran no self-"):
        gk.sample(model, torch.randn(1, 2, 8, 8), strategy=gk.SAG(layers=("up1",)), **kw)
    with pytest.raises(gk.ConfigError, match=r"inner: expected a strategy in 'eps' or 'any' space"):
        gk.SAG(gk.APG())
    with pytest.raises(gk.ConfigError, match=r"kernel_size: expected an odd number of taps, got 8"):
        gk.SAG(kernel_size=8)


@pytest.mark.diffusers
@pytest.mark.parametrize(("w", "nfe"), [(4.5, 12), (1.0, 8)])
def test_sag_equals_the_diffusers_sag_pipeline(w, nfe):
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionSAGPipeline

    from guidekit.integrations.diffusers import generate
    from guidekit.integrations.diffusers.tiny import tiny_pipeline

    pipe, kw = tiny_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    reference = StableDiffusionSAGPipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    common = dict(kw, num_inference_steps=4, output_type="latent")

    def latents() -> torch.Tensor:
        return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))

    theirs = reference(**common, guidance_scale=w, sag_scale=0.75, latents=latents()).images
    ours, info = generate(pipe, gk.SAG(gk.CFG(w), scale=0.75), **common, latents=latents(), return_info=True)
    plain = generate(pipe, gk.CFG(w), **common, latents=latents()).images
    scale = float(theirs.abs().max())
    assert float((ours.images - theirs).abs().max()) < 2e-6 * scale  # float32: blur kernel and batching rounding
    assert float((plain - theirs).abs().max()) > 1e-2 * scale
    assert info.nfe == nfe
    assert all(not m._forward_pre_hooks for m in pipe.unet.modules())


def test_a_distributed_backend_refuses_observers_on_several_ranks():
    """Attention maps are not gathered across ranks: SAG/S-CFG on several ranks are refused, not silently CFG."""
    from guidekit.distributed import DistributedBackend
    from guidekit.engine import NativeBackend

    backend = object.__new__(DistributedBackend)  # the guard alone (a real one needs a process group)
    backend.inner, backend.world = NativeBackend({"main": gk.samplers.EDMModel(TinyAttentionNet())}), 2
    backend.check_branch(gk.UNCOND)
    with pytest.raises(gk.ConfigError, match=r"attention maps .* are not gathered across ranks"):
        backend.check_branch(gk.Branch("uncond", condition="uncond", observe=gk.AttentionMaps(("mid",))))


@pytest.mark.diffusers
def test_the_native_backend_observes_diffusers_attention_modules():
    """A native model built from diffusers' ``Attention`` (registered with the observer when
    ``guidekit.integrations.diffusers`` is imported): SAG reads its map, equal to the layer's own softmax."""
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention
    from torch import nn

    import guidekit.integrations.diffusers  # noqa: F401  (registers diffusers' Attention)
    from guidekit.engine import NativeBackend

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.inp, self.out = nn.Conv2d(2, 16, 3, padding=1), nn.Conv2d(16, 2, 3, padding=1)
            self.label = nn.Embedding(NULL + 1, 16)
            self.mid = nn.Module()
            self.mid.attn1 = Attention(16, heads=2, dim_head=8)

        def forward(self, x, sigma, labels):
            s = sigma.reshape(-1, 1, 1, 1)
            h = self.inp(x / (s**2 + 1).sqrt()) + self.label(labels)[..., None, None]
            t = h.flatten(2).transpose(1, 2)
            t = t + self.mid.attn1(t)
            return x / (s**2 + 1) + s / (s**2 + 1).sqrt() * self.out(t.transpose(1, 2).reshape(h.shape))

    model = Net()
    x, sigma, cond, uncond = _inputs()
    backend = NativeBackend({"main": gk.samplers.EDMModel(model)})
    with torch.no_grad():
        out = backend.forward(x, sigma, [gk.Branch("cond", observe=gk.AttentionMaps(("mid",)))], {"cond": cond})
        amap = out[gk.branch.observation_key("cond", "self:mid.attn1")]
        t = model.inp(x / (sigma.reshape(-1, 1, 1, 1) ** 2 + 1).sqrt()) + model.label(cond)[..., None, None]
        t = t.flatten(2).transpose(1, 2)
        attn = model.mid.attn1
        q, k = (f(t).view(2, -1, 2, 8).transpose(1, 2) for f in (attn.to_q, attn.to_k))
        ref = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1).mean(1)
        assert torch.allclose(amap, ref, atol=1e-6)
        sag = gk.guided(gk.samplers.EDMModel(model), gk.SAG(gk.CFG(3.0)), cond, uncond)
        cfg = gk.guided(gk.samplers.EDMModel(model), gk.CFG(3.0), cond, uncond)
        assert not torch.allclose(sag(x, sigma, INFO), cfg(x, sigma, INFO), atol=1e-5) and sag.nfe == 3
