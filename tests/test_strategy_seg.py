"""SEG (smoothed energy guidance): the attention queries blurred for the perturbed forward.

* Infinite blur = uniform attention: in the perturbed forward every token of the selected attention gets the
  same output (checked inside the video model's space-time attention, native backend).
* A finite blur is the separable Gaussian of the paper over the square token grid (odd ``ceil(6σ)+1`` kernel,
  reflect padding), and tends to the infinite blur's mean as σ grows; a non-square grid is refused by name.
* Through a diffusers pipeline the queries of the selected layers are blurred and restored after the forward;
  ``scale = 0`` is the inner strategy.
"""

from __future__ import annotations

import pytest
import torch

import guidekit as gk
from guidekit.ops.attention import blur_queries


def test_infinite_blur_gives_every_token_the_same_attention_output_in_the_video_model():
    from guidekit.zoo.video import load_denoiser

    model = load_denoiser()
    outputs: list[torch.Tensor] = []
    hook = model.net.attn.register_forward_hook(lambda m, i, o: outputs.append(o - i[0]))  # the attention's share
    x, labels = torch.randn(1, 1, 8, 16, 16, generator=torch.Generator().manual_seed(0)) * 2.0, torch.tensor([4])
    den = gk.guided(gk.samplers.EDMModel(model, prediction="x0", layout="b c f h w"),
                    gk.SEG(gk.CFG(1.0), scale=1.0, layers=("attn",)), labels, None)  # fmt: skip
    with torch.no_grad():
        den(x, torch.full((1,), 2.0), gk.samplers.StepInfo(0, 1, torch.tensor([2.0, 0.0], dtype=torch.float64)))
    hook.remove()
    plain, perturbed = outputs  # the conditional forward, then the perturbed one
    tokens = perturbed.flatten(2)  # (b, c, f*h*w)
    assert torch.allclose(tokens, tokens[..., :1].expand_as(tokens), atol=1e-5)  # one output for all tokens
    assert not torch.allclose(plain.flatten(2), plain.flatten(2)[..., :1].expand_as(tokens), atol=1e-3)
    assert "forward" not in model.net.attn.attn.__dict__


def test_a_finite_blur_is_the_separable_gaussian_and_tends_to_the_mean():
    q = torch.randn(2, 64, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigma = 1.0
    size = 7  # ceil(6σ) + 1, odd
    t = torch.arange(size, dtype=torch.float64) - 3
    k1 = torch.exp(-0.5 * t**2)
    k2 = torch.outer(k1, k1) / k1.sum() ** 2
    grid = q.permute(0, 2, 1).reshape(10, 1, 8, 8)
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(grid, (3, 3, 3, 3), mode="reflect"), k2[None, None])
    assert torch.allclose(blur_queries(q, sigma), ref.reshape(2, 5, 64).permute(0, 2, 1), atol=1e-12)
    wide = blur_queries(q, 3000.0)  # the kernel is clipped to the grid: close to, not equal to, the mean
    assert float((wide - q.mean(1, keepdim=True)).abs().max()) < float(
        (blur_queries(q, 1.0) - q.mean(1, keepdim=True)).abs().max()
    )
    assert torch.equal(blur_queries(q, 1e8), q.mean(1, keepdim=True).expand_as(q))
    with pytest.raises(gk.ConfigError, match="a finite query blur needs a square token grid, got 60 tokens"):
        blur_queries(q[:, :60], 1.0)


@pytest.mark.diffusers
def test_seg_through_a_diffusers_pipeline_blurs_and_restores():
    pytest.importorskip("diffusers")
    from guidekit.integrations.diffusers import generate
    from guidekit.integrations.diffusers.tiny import tiny_pipeline

    pipe, kw = tiny_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    common = dict(kw, num_inference_steps=3, output_type="latent")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    seg, info = generate(pipe, gk.SEG(gk.CFG(3.0)), **common, latents=latents.clone(), return_info=True)
    cfg = generate(pipe, gk.CFG(3.0), **common, latents=latents.clone()).images
    zero = generate(pipe, gk.SEG(gk.CFG(3.0), scale=0.0), **common, latents=latents.clone()).images
    assert info.nfe == 9 and not torch.allclose(seg.images, cfg, atol=1e-4) and torch.equal(zero, cfg)
    assert all("forward" not in m.to_q.__dict__ for n, m in pipe.unet.named_modules() if n.endswith("attn1"))
