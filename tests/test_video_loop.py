"""The same loop on 5D video latents: (b, c, f, h, w) and CogVideoX's (b, f, c, h, w)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loop_helpers import single_thread  # noqa: F401 - autouse fixture

import guidekit as gk
from guidekit.errors import LayoutError
from guidekit.oracle import GaussianMixture
from guidekit.strategies import APG, CFG, SAMG, Interval

F64 = torch.float64
B = 4
LABELS = torch.tensor([0, 1, 2, 0])
UNCOND = torch.full((B,), -1)

STRATEGIES = {
    "cfg": CFG(4.0),
    "apg": APG(scale=4.0, eta=0.0, norm_threshold=2.0, momentum=-0.5),
    "samg": SAMG(w_min=2.0, w_max=6.0),
    "interval": Interval(CFG(4.0), 0.3, 3.0),
}


def video_oracle(c: int, f: int, h: int, w: int) -> GaussianMixture:
    return GaussianMixture.random(3, 2, (c, f, h, w), spread=3.0, std=0.5, seed=11)


def run(model, x_t, strategy, layout, sampler="heun", prediction="v"):
    generators = [torch.Generator().manual_seed(i) for i in range(B)]
    return gk.sample(model, x_t, sampler=sampler, steps=6, strategy=strategy, cond=LABELS, uncond=UNCOND,
                     prediction=prediction, layout=layout, generator=generators)  # fmt: skip


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_five_d_run_equals_the_frame_flattened_run(name):
    """Per-sample strategies reduce over all non-batch dims, so (b, c, f, h, w) == (b, c, f*h, w)."""
    c, f, h, w = 2, 3, 2, 2
    model = video_oracle(c, f, h, w).as_model("v")
    flat = lambda x, t, cond: model(x.reshape(-1, c, f, h, w), t, cond).reshape(x.shape)  # noqa: E731
    x_t = torch.randn(B, c, f, h, w, generator=torch.Generator().manual_seed(0), dtype=F64)
    video = run(model, x_t, STRATEGIES[name], "b c f h w")
    image = run(flat, x_t.reshape(B, c, f * h, w), STRATEGIES[name], "b c h w")
    assert torch.allclose(video.reshape(image.shape), image, rtol=0, atol=1e-12)


@settings(max_examples=8)
@given(
    name=st.sampled_from(list(STRATEGIES)),
    sampler=st.sampled_from(["euler", "heun", "euler-ancestral", "dpmpp-2m"]),
    dims=st.tuples(st.integers(1, 3), st.integers(2, 4), st.integers(1, 3), st.integers(1, 3)),
)
def test_cogvideox_layout_equals_the_channel_first_layout(name, sampler, dims):
    """(b, f, c, h, w) run == (b, c, f, h, w) run after permutation: the layout is named once, at the edge."""
    c, f, h, w = dims
    model = video_oracle(c, f, h, w).as_model("v")  # a (b, c, f, h, w) model

    def cogvideox(x, t, cond):  # the same model seen in (b, f, c, h, w)
        assert x.shape[1:] == (f, c, h, w)
        return model(x.permute(0, 2, 1, 3, 4), t, cond).permute(0, 2, 1, 3, 4)

    x_t = torch.randn(B, c, f, h, w, generator=torch.Generator().manual_seed(1), dtype=F64)
    channel_first = run(model, x_t, STRATEGIES[name], "b c f h w", sampler)
    frames_first = run(cogvideox, x_t.permute(0, 2, 1, 3, 4), STRATEGIES[name], "b f c h w", sampler)
    assert frames_first.shape == (B, f, c, h, w)
    assert torch.allclose(frames_first.permute(0, 2, 1, 3, 4), channel_first, rtol=0, atol=1e-12)


def test_video_sampling_converges_to_the_class():
    """The loop on 5D flow latents reaches the right class (p(class | x) > 0.95 on every sample)."""
    gm = video_oracle(2, 3, 2, 2)
    x_t = torch.randn(B, 2, 3, 2, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    out = gk.sample(gm.as_model("flow"), x_t, sampler="flow-euler", steps=20, prediction="flow", cond=LABELS,
                    layout="b c f h w")  # fmt: skip
    assert bool((gm.class_posterior(out, LABELS) > 0.95).all())


def test_a_layout_that_does_not_match_the_video_is_named():
    model = video_oracle(2, 3, 2, 2).as_model("v")
    with pytest.raises(LayoutError, match=r"x_T: layout 'b c h w' has 4 axes but the tensor has 5 dims"):
        gk.sample(model, torch.randn(B, 2, 3, 2, 2, dtype=F64), steps=2, cond=LABELS, prediction="v")
    with pytest.raises(LayoutError, match=r"layout: expected an axis named 'c'"):
        gk.sample(model, torch.randn(B, 2, 3, 2, 2, dtype=F64), steps=2, cond=LABELS, prediction="v",
                  layout="b f x h w")  # fmt: skip
