"""Bad input to ``gk.sample`` / ``gk.guided`` and to strategies: an error naming the argument, or a defined
pass-through (issue 18 defects 8-10 on the loop). Each case used to end in a torch/Python error or a silent
change."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

import guidekit as gk
from guidekit.oracle import UNCOND, GaussianMixture

GM = GaussianMixture.random(num_classes=3, components=2, event_shape=(2, 3, 3), spread=2.0, std=0.4, seed=7)
LABELS = torch.tensor([0, 1, 2])
UNCONDS = torch.full((3,), UNCOND)


def x_T(n: int = 3, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(n, 2, 3, 3, generator=torch.Generator().manual_seed(0)).to(dtype)


def run(**kw: Any) -> Tensor:
    args: dict[str, Any] = dict(steps=4, cond=LABELS, uncond=UNCONDS, prediction="edm", progress=False)
    args.update(kw)
    return gk.sample(GM.as_model("edm"), args.pop("x", x_T()), **args)


@pytest.mark.parametrize(
    ("schedule", "match"),
    [
        ([], r"schedule: expected a 1-D schedule of at least 2 sigmas"),
        ([[3.0, 1.0, 0.0]], r"schedule: expected a 1-D schedule"),
        ([2.0], r"schedule: expected a 1-D schedule"),
        ("karras-ish", r"schedule: expected a sigma tensor or one of"),
        (object(), r"schedule: expected a name, a 1-D tensor or a sequence"),
    ],
)
def test_a_bad_schedule_is_named(schedule, match):
    with pytest.raises(gk.ConfigError, match=match):
        run(schedule=schedule, steps=None)


def test_a_misspelled_sampler_option_is_named_with_the_known_ones():
    with pytest.raises(gk.ConfigError, match=r"sampler_options: expected options of sample_ddim \(eta, generator\)"):
        run(sampler="ddim", sampler_options={"etta": 0.5})


def test_a_string_generator_is_refused():
    with pytest.raises(gk.ConfigError, match=r"generator: expected None, a torch.Generator or one per sample"):
        run(sampler="euler-ancestral", generator="seed-0")


def test_integer_noise_and_integer_predictions_are_refused():
    with pytest.raises(gk.ConfigError, match=r"x_T: expected a floating-point tensor, got torch.int64"):
        run(x=torch.zeros(3, 2, 3, 3, dtype=torch.long))
    c = torch.ones(2, 1, 2, 2, dtype=torch.long)
    for strategy in (gk.CFG(3.0), gk.APG(), gk.SAMG()):
        with pytest.raises(gk.ShapeError, match=r"pred_cond: expected a floating-point tensor, got torch.int64"):
            strategy(c, c)


@pytest.mark.parametrize("name", gk.strategies.names())
def test_an_empty_batch_passes_through_every_strategy(name):
    from guidekit.testing import example_strategy

    s = example_strategy(name)
    c = torch.zeros(0, 4, 3, 3)
    assert s(c, c.clone()).shape == (0, 4, 3, 3)


def test_meta_tensors_run_without_reading_values():
    c = torch.empty(2, 4, 8, 8, device="meta")
    for strategy in (gk.CFG(3.0), gk.Rescale(gk.CFG(3.0))):
        assert strategy(c, c).device.type == "meta"


def test_a_model_that_upcasts_keeps_the_sample_dtype():
    model = GM.as_model("edm")

    def upcasting(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        return model(x, t, cond).double()

    out = gk.sample(upcasting, x_T(), steps=4, cond=LABELS, uncond=UNCONDS, prediction="edm", strategy=gk.CFG(3.0))
    assert out.dtype == torch.float32


def test_a_nan_sigma_is_not_silently_outside_an_interval():
    c = torch.ones(1, 1, 2, 2)
    ctx = gk.GuidanceContext(sigma=torch.tensor([float("nan")]))
    with pytest.raises(gk.ConfigError, match=r"ctx\.sigma: expected a noise level, got NaN"):
        gk.Interval(gk.CFG(3.0))(c, c, ctx)


def test_a_reused_denoiser_restarts_instead_of_carrying_momentum_over():
    records: list[gk.StepRecord] = []
    model = gk.samplers.EDMModel(GM.as_model("edm"))
    den = gk.guided(model, gk.APG(scale=4.0, momentum=-0.5), LABELS, UNCONDS)
    sigmas = gk.samplers.karras_sigmas(6)
    x = model.initial_x(x_T(dtype=torch.float64), sigmas[0])
    first = gk.samplers.sample_euler(den, x, sigmas, callback=lambda s: records.append(den.record(s.step)))
    second = gk.samplers.sample_euler(den, x, sigmas)
    assert torch.equal(first, second) and den.nfe == 12  # not 24 after two 6-step runs


def test_guider_repr_never_raises():
    pytest.importorskip("diffusers")
    from guidekit.integrations.diffusers import GuidekitGuider

    assert repr(GuidekitGuider(gk.CFG(3.0))).startswith("GuidekitGuider(strategy=CFG(scale=3.0)")
