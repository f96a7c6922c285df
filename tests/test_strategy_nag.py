"""NAG (normalized attention guidance): attention-space negative guidance in one forward.

* The formula (``guidekit.ops.attention.normalized_attention``): φ = 1 or α = 0 is ``z⁺``; with α = 1 the
  output's L1 norm per token is at most τ times ``z⁺``'s; an infinite τ is the linear extrapolation.
* Native backend (``nn.MultiheadAttention``, float32 and float64): the guided prediction equals a by-hand
  model whose cross-attention computes ``z⁺``, ``z⁻`` through an identity output projection, applies the rule
  written out here and projects; self-attention untouched; φ = 1 is the plain conditional forward; one forward
  per step carrying the negative rows (NFE 2 at CFG 1, 3 with CFG); the attention modules are restored.
* Diffusers backend (tiny SD pipeline, ``attn2``): φ = 1 is plain CFG-1, φ > 1 moves the sample, the
  processors are restored; a joint-attention model without cross-attention is refused by name.
"""

from __future__ import annotations

import copy

import pytest
import torch
from attention_models import NULL, TinyAttentionNet

import guidekit as gk
from guidekit.ops.attention import normalized_attention


def test_the_rule_limits():
    g = torch.Generator().manual_seed(0)
    zp, zn = (
        torch.randn(2, 5, 8, generator=g, dtype=torch.float64),
        torch.randn(2, 5, 8, generator=g, dtype=torch.float64),
    )
    assert torch.equal(normalized_attention(zp, zn, 1.0, 2.5, 0.25), zp)
    assert torch.equal(normalized_attention(zp, zn, 4.0, 2.5, 0.0), zp)
    free = normalized_attention(zp, zn, 4.0, float("inf"), 1.0)
    assert torch.allclose(free, zp + 3.0 * (zp - zn), atol=1e-12)
    capped = normalized_attention(zp, zn, 4.0, 1.5, 1.0)
    assert bool((capped.abs().sum(-1) <= 1.5 * zp.abs().sum(-1) + 1e-12).all())
    assert bool(torch.isclose(capped.abs().sum(-1), 1.5 * zp.abs().sum(-1)).any())  # the cap is reached
    assert torch.isfinite(normalized_attention(torch.zeros_like(zp), zn, 4.0, 2.5, 0.5)).all()


def _by_hand(model: TinyAttentionNet, scale: float, tau: float, alpha: float) -> TinyAttentionNet:
    """The model with its cross-attention replaced by NAG written out from the paper (z before out_proj)."""
    ref = copy.deepcopy(model)
    attn = ref.up1.cross_attn
    bare = copy.deepcopy(attn)
    bare.out_proj.weight.data = torch.eye(attn.embed_dim, dtype=attn.out_proj.weight.dtype)
    bare.out_proj.bias.data.zero_()

    def forward(q, k, v, **kw):
        b = q.shape[0] // 2  # rows [cond; negative]
        zp = bare(q[:b], k[:b], v[:b], need_weights=False)[0]
        zn = bare(q[:b], k[b:], v[b:], need_weights=False)[0]
        zg = scale * zp - (scale - 1) * zn
        ratio = zg.abs().sum(-1, keepdim=True) / zp.abs().sum(-1, keepdim=True)
        zg = zg * torch.clamp(ratio, max=tau) / ratio
        out = attn.out_proj(alpha * zg + (1 - alpha) * zp)
        return torch.cat([out, out]), None

    attn.forward = forward
    return ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_nag_equals_the_rule_by_hand_and_is_one_forward(dtype):
    model = TinyAttentionNet().to(dtype)
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1), dtype=dtype) * 3.0
    sigma, cond, neg = torch.full((2,), 3.0, dtype=dtype), torch.tensor([0, 1]), torch.tensor([2, 3])
    info = gk.samplers.StepInfo(0, 1, torch.tensor([3.0, 0.0], dtype=torch.float64))
    strategy = gk.NAG(scale=4.0, tau=1.5, alpha=0.5)
    with torch.no_grad():
        den = gk.guided(gk.samplers.EDMModel(model), strategy, cond, neg)
        ours = den(x, sigma, info)
        ref = _by_hand(model, 4.0, 1.5, 0.5)(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, neg]))[:2]
        plain = model(x, sigma, cond)
        one = gk.guided(gk.samplers.EDMModel(model), gk.NAG(scale=1.0), cond, neg)(x, sigma, info)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert ours.dtype == dtype and torch.allclose(ours, ref, atol=tol), float((ours - ref).abs().max())
    assert not torch.allclose(ours, plain, atol=1e-3)  # the negative context matters
    assert torch.equal(one, plain)  # φ = 1 plans the plain forward
    assert den.nfe == 2 and den.forwards == 1  # one forward carrying the negative rows
    assert "forward" not in model.up1.cross_attn.__dict__ and "forward" not in model.mid.self_attn.__dict__


def test_native_nag_with_cfg_and_combinators():
    model = TinyAttentionNet()
    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(2)) * 20.0
    kw = dict(prediction="edm", steps=4, cond=torch.tensor([1]), uncond=torch.tensor([NULL]), progress=False)
    records: list[gk.StepRecord] = []
    with torch.no_grad():
        both = gk.sample(model, x, strategy=gk.NAG(gk.CFG(3.0)), callback=records.append, **kw)
        cfg = gk.sample(model, x, strategy=gk.CFG(3.0), **kw)
        assert records[-1].nfe == 12 and set(records[0].branches) == {"cond", "uncond"}
        assert not torch.allclose(both, cfg, atol=1e-4)
        assert torch.equal(gk.sample(model, x, strategy=gk.NAG(gk.CFG(3.0), scale=1.0), **kw), cfg)
        inside = gk.Interval(gk.NAG(gk.CFG(3.0)), sigma_lo=0.0, sigma_hi=1e9)
        assert torch.equal(gk.sample(model, x, strategy=inside, **kw), both)
        outside = gk.Interval(gk.NAG(gk.CFG(1.0)), sigma_lo=1e8, sigma_hi=1e9)
        assert torch.equal(gk.sample(model, x, strategy=outside, **kw), gk.sample(model, x, strategy=gk.CFG(1.0), **kw))
        rescaled = gk.sample(model, x, strategy=gk.Rescale(gk.NAG(gk.CFG(3.0)), 0.7), **kw)
        assert not torch.allclose(rescaled, both, atol=1e-5)


def test_native_nag_errors_name_what_is_missing():
    model = TinyAttentionNet()
    x = torch.randn(1, 2, 8, 8)
    kw = dict(prediction="edm", steps=2, cond=torch.tensor([1]), progress=False)
    with pytest.raises(gk.ConfigError, match=r"uncond: expected the unconditional condition"):
        gk.sample(model, x, strategy=gk.NAG(), **kw)
    with pytest.raises(gk.ConfigError, match=r"layer selector 'nowhere' matches no attention .*up1\.cross_attn"):
        gk.sample(model, x, strategy=gk.NAG(layers=("nowhere",)), uncond=torch.tensor([NULL]), **kw)
    with pytest.raises(gk.ConfigError, match=r"alpha: expected a number <= 1.0"):
        gk.NAG(alpha=2.0)


@pytest.mark.diffusers
def test_nag_through_a_diffusers_pipeline():
    pytest.importorskip("diffusers")
    from guidekit.integrations.diffusers import generate
    from guidekit.integrations.diffusers.tiny import tiny_pipeline

    pipe, kw = tiny_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    common = dict(kw, num_inference_steps=3, output_type="latent")

    def latents() -> torch.Tensor:
        return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))

    nag, info = generate(pipe, gk.NAG(), **common, latents=latents(), return_info=True)
    plain = generate(pipe, gk.CFG(1.0), **common, latents=latents()).images
    near_one = generate(pipe, gk.NAG(scale=1.0 + 1e-9), **common, latents=latents()).images  # the NAG path
    assert info.nfe == 6 and info.forwards == 3  # one forward a step, carrying the negative prompt's rows
    assert float((near_one - plain).abs().max()) < 1e-5 * float(plain.abs().max())
    assert float((nag.images - plain).abs().max()) > 1e-3 * float(plain.abs().max())
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before
    with pytest.raises(gk.ConfigError, match=r"layer selector .nowhere. matches no cross-attention layer.*attn2"):
        generate(pipe, gk.NAG(layers=("nowhere",)), **common, latents=latents())


def test_max_batch_counts_the_negative_rows_a_nag_branch_carries():
    model = TinyAttentionNet()
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3)) * 3.0
    sigma, cond, neg = torch.full((2,), 3.0), torch.tensor([0, 1]), torch.tensor([2, 3])
    info = gk.samplers.StepInfo(0, 1, torch.tensor([3.0, 0.0], dtype=torch.float64))
    with torch.no_grad():
        full = gk.guided(gk.samplers.EDMModel(model), gk.NAG(gk.CFG(3.0)), cond, neg)(x, sigma, info)
        capped = gk.guided(gk.samplers.EDMModel(model), gk.NAG(gk.CFG(3.0)), cond, neg, max_batch=4)
        assert torch.equal(capped(x, sigma, info), full) and capped.nfe == 3
        with pytest.raises(gk.ConfigError, match=r"max_batch: expected at least the rows of one branch \(4 rows"):
            gk.guided(gk.samplers.EDMModel(model), gk.NAG(gk.CFG(3.0)), cond, neg, max_batch=3)(x, sigma, info)
