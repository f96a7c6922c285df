"""STG (spatiotemporal skip guidance, STG-R) on video: SLG's rule on skipped residual blocks, then rescaled.

* ``STG(inner, s, layers, ρ)`` equals ``Rescale(SLG(inner, s, layers), ρ)`` and, with ``ρ = 0``, SLG itself,
  through the engine on the embedded video model (native backend, 5D latents, both layouts).
* The rescale is the reference's ``ĝ · (ρ std(c)/std(ĝ) + 1 − ρ)`` for batch 1 (the reference's global std).
"""

from __future__ import annotations

import pytest
import torch

import guidekit as gk


@pytest.fixture(scope="module")
def video():
    from guidekit.zoo.video import load_denoiser

    return load_denoiser()


@pytest.mark.parametrize("layout", ["b c f h w", "b f c h w"])
def test_stg_is_rescaled_slg_on_the_video_model(video, layout):
    model = video if layout == "b c f h w" else video.with_layout(layout)
    shape = (1, 1, 8, 16, 16) if layout == "b c f h w" else (1, 8, 1, 16, 16)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 80.0
    kw = dict(prediction="edm", layout=layout, steps=3, cond=torch.tensor([5]), uncond=torch.tensor([video.null_label]))
    kw["progress"] = False
    slg = gk.SLG(gk.CFG(3.0), scale=1.0, layers=("net.mid2",))
    out = gk.sample(model, x, strategy=gk.STG(gk.CFG(3.0), scale=1.0, layers=("net.mid2",), rescale=0.7), **kw)
    assert torch.allclose(out, gk.sample(model, x, strategy=gk.Rescale(slg, 0.7), **kw), atol=1e-6)
    no_rescale = gk.sample(model, x, strategy=gk.STG(gk.CFG(3.0), 1.0, ("net.mid2",), rescale=0.0), **kw)
    assert torch.equal(no_rescale, gk.sample(model, x, strategy=slg, **kw))
    assert not torch.allclose(out, no_rescale, atol=1e-4)


def test_stg_rescale_is_the_reference_formula_for_one_clip():
    c, u, p = (torch.randn(1, 2, 3, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    s = gk.STG(gk.CFG(2.0), scale=1.5, layers=("x",), rescale=0.7)
    ctx = gk.GuidanceContext.default(c)
    out, _ = s.combine_branches({"cond": c, "uncond": u, "perturbed": p}, ctx, None)
    g = u + 2.0 * (c - u) + 1.5 * (c - p)
    reference = g * (0.7 * c.std() / g.std() + 0.3)  # the STG pipelines' global std
    assert torch.allclose(out, reference, atol=1e-5)
