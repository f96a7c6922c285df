"""Conversions between parameterisations and the model adapters."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from loop_helpers import mixture, noise, single_thread  # noqa: F401 - autouse fixture

from guidekit.errors import ConfigError, LayoutError, NonFiniteError, ShapeError
from guidekit.ops.spaces import (
    convert,
    eps_from_x0,
    flow_t_from_sigma,
    flow_x,
    from_x0,
    sigma_from_flow_t,
    to_x0,
    vp_alpha,
    vp_sigma,
    vp_x,
    x0_from_eps,
)
from guidekit.ops.timesteps import betas_linear, betas_scaled_linear, vp_sigma_from_timestep, vp_timestep_from_sigma
from guidekit.samplers import EDMModel, FlowModel, VPModel, adapt

F64 = torch.float64
SPACES = ["x0", "eps", "v", "flow"]
ACP = torch.cumprod(1 - betas_scaled_linear(), 0)

sigmas = st.floats(1e-3, 1e3)
seeds = st.integers(0, 2**16)


def truth(seed: int, sigma: float, shape=(3, 2, 4)):
    """x0, eps and every prediction of them at EDM sigma, from the definitions (methods.md §2 table)."""
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64)
    s = torch.full((shape[0],), sigma, dtype=F64)
    alpha, sig_vp, t = 1 / math.sqrt(1 + sigma**2), sigma / math.sqrt(1 + sigma**2), sigma / (1 + sigma)
    x = x0 + sigma * eps
    preds = {"x0": x0, "eps": eps, "v": alpha * eps - sig_vp * x0, "flow": eps - x0}
    coords = {"edm": x, "vp": alpha * x0 + sig_vp * eps, "flow": (1 - t) * x0 + t * eps}
    return x, s, preds, coords


@given(seed=seeds, sigma=sigmas, src=st.sampled_from(SPACES), dst=st.sampled_from(SPACES))
def test_convert_agrees_with_the_definitions(seed, sigma, src, dst):
    x, s, preds, _ = truth(seed, sigma)
    assert torch.allclose(convert(preds[src], src, dst, x, s), preds[dst], rtol=1e-9, atol=1e-9 * (1 + sigma))
    assert torch.allclose(to_x0(preds[src], src, x, s), preds["x0"], rtol=1e-9, atol=1e-9 * (1 + sigma))


@given(seed=seeds, sigma=sigmas)
def test_coordinates_agree_with_the_definitions(seed, sigma):
    x, s, _, coords = truth(seed, sigma)
    assert torch.allclose(vp_x(x, s), coords["vp"], atol=1e-12 * (1 + sigma))
    assert torch.allclose(flow_x(x, s), coords["flow"], atol=1e-12 * (1 + sigma))


@given(seed=seeds, sigma=sigmas, src=st.sampled_from(SPACES), dst=st.sampled_from(SPACES), w=st.floats(-3, 10))
def test_conversion_is_affine_with_shared_coefficients(seed, sigma, src, dst, w):
    """The linearity lemma: CFG in one space equals CFG in any other (methods.md §2)."""
    x, s, preds, _ = truth(seed, sigma)
    c, u = preds[src], preds[src] + torch.randn_like(preds[src])
    guided = u + w * (c - u)
    cu, uu = convert(c, src, dst, x, s), convert(u, src, dst, x, s)
    scale = 1 + sigma + abs(w) * (1 + sigma)
    assert torch.allclose(convert(guided, src, dst, x, s), uu + w * (cu - uu), atol=1e-9 * scale)


def test_singular_points():
    x = noise(2)
    zero, inf = torch.zeros(2, dtype=F64), torch.full((2,), math.inf, dtype=F64)
    # sigma = 0: x0 = x whatever the prediction; eps is 0 by convention
    for space in SPACES[1:]:
        assert torch.equal(to_x0(torch.randn_like(x), space, x, zero), x) or space != "eps"
    assert torch.allclose(to_x0(torch.randn_like(x), "v", x, zero), x)
    assert torch.allclose(to_x0(torch.randn_like(x), "flow", x, zero), x)
    assert torch.equal(eps_from_x0(noise(2, seed=1), x, zero), torch.zeros_like(x))
    # sigma = inf: x holds x / sigma (the noise); v = -x0, flow velocity = x - x0, eps = x
    x0 = noise(2, seed=2)
    assert torch.allclose(from_x0(x0, "v", x, inf), -x0)
    assert torch.allclose(from_x0(x0, "flow", x, inf), x - x0)
    assert torch.allclose(from_x0(x0, "eps", x, inf), x)
    assert torch.allclose(to_x0(from_x0(x0, "flow", x, inf), "flow", x, inf), x0)
    assert torch.allclose(to_x0(from_x0(x0, "v", x, inf), "v", x, inf), x0)
    with pytest.raises(NonFiniteError, match="sigma: an eps prediction does not determine x0 at sigma = inf"):
        x0_from_eps(x, x, inf)
    # noise levels at the ends
    assert float(vp_alpha(torch.tensor(math.inf))) == 0 and float(vp_sigma(torch.tensor(math.inf))) == 1
    assert float(vp_alpha(torch.tensor(0.0))) == 1 and float(vp_sigma(torch.tensor(0.0))) == 0
    assert float(flow_t_from_sigma(torch.tensor(math.inf))) == 1 and float(flow_t_from_sigma(torch.tensor(0.0))) == 0
    assert math.isinf(float(sigma_from_flow_t(torch.tensor(1.0)))) and float(sigma_from_flow_t(torch.tensor(0.0))) == 0


@given(t=st.floats(0, 999))
def test_vp_time_round_trips(t):
    s = vp_sigma_from_timestep(torch.tensor([t], dtype=F64), ACP)
    assert float(vp_timestep_from_sigma(s, ACP)[0]) == pytest.approx(t, abs=1e-7)


def test_vp_sigma_is_exact_on_the_grid_and_matches_diffusers():
    t = torch.arange(0, 1000, 37, dtype=F64)
    expected = ((1 - ACP[t.long()]) / ACP[t.long()]).sqrt()
    assert torch.allclose(vp_sigma_from_timestep(t, ACP), expected, rtol=1e-12)
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", use_karras_sigmas=True)
    sched.set_timesteps(15)
    ours = vp_timestep_from_sigma(sched.sigmas[:-1].to(F64), sched.alphas_cumprod.to(F64))
    assert torch.allclose(ours, sched.timesteps.to(F64), atol=2e-3)  # diffusers computes in float32


def test_vp_time_outside_the_grid_is_refused_not_clipped():
    with pytest.raises(
        ConfigError,
        match=r"sigma: expected values in the model's range \[0.0291672, 14.6146\].*got values in \[200, 200\]",
    ):
        vp_timestep_from_sigma(torch.tensor([200.0], dtype=F64), ACP)
    with pytest.raises(ConfigError, match="t: expected training timesteps in"):
        vp_sigma_from_timestep(torch.tensor([1000.0], dtype=F64), ACP)


def test_zero_terminal_snr_grid():
    """CogVideoX-style rescaled betas end at alphas_cumprod = 0: sigma_max = inf, the last timestep."""
    acp = torch.cumprod(1 - betas_linear(), 0)
    acp[-1] = 0.0
    assert math.isinf(float(vp_sigma_from_timestep(torch.tensor([999.0], dtype=F64), acp)[0]))
    assert float(vp_timestep_from_sigma(torch.tensor([math.inf], dtype=F64), acp)[0]) == 999


# -- adapters --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda gm: VPModel(gm.as_model("eps", alphas_cumprod=ACP), ACP, "eps"),
        lambda gm: VPModel(gm.as_model("v", alphas_cumprod=ACP), ACP, "v"),
        lambda gm: VPModel(gm.as_model("x0", alphas_cumprod=ACP), ACP, "x0"),
        lambda gm: FlowModel(gm.as_model("flow"), "flow"),
        lambda gm: FlowModel(gm.as_model("flow", time_scale=1000.0), "flow", time_scale=1000.0),
        lambda gm: EDMModel(gm.as_model("edm"), "x0"),
    ],
    ids=["vp-eps", "vp-v", "vp-x0", "flow", "flow-1000", "edm"],
)
@given(sigma=st.floats(0.05, 14.0), seed=seeds)
def test_every_adapter_is_the_exact_edm_denoiser(make, sigma, seed):
    gm = mixture()
    adapter = make(gm)
    x = noise(6, seed=seed) * sigma + gm.sample(1, 6, generator=torch.Generator().manual_seed(seed))
    s = torch.full((6,), sigma, dtype=F64)
    labels = torch.tensor([0, 1, 2, -1, 0, 1])
    assert torch.allclose(adapter(x, s, cond=labels), gm.predict(x, s, labels), atol=1e-8)


def test_flow_adapter_at_t_one_and_vp_v_adapter_at_zero_snr():
    gm = mixture()
    x = noise(4)  # at sigma = inf, x holds the unit noise
    inf = torch.full((4,), math.inf, dtype=F64)
    uncond = torch.full((4,), -1)
    prior_mean = gm.predict(x, inf, uncond)  # E[x0] of the unconditional mixture
    assert torch.allclose(FlowModel(gm.as_model("flow"))(x, inf, cond=uncond), prior_mean)
    acp = torch.cumprod(1 - betas_linear(), 0)
    acp[-1] = 0.0
    assert torch.allclose(VPModel(gm.as_model("v", alphas_cumprod=acp), acp, "v")(x, inf, cond=uncond), prior_mean)
    with pytest.raises(NonFiniteError, match="sigma"):
        VPModel(gm.as_model("eps", alphas_cumprod=acp), acp, "eps")(x, inf, cond=uncond)


def test_layout_is_converted_at_the_edge():
    """A (b, f, c, h, w) model is called in its own layout; samplers see (b, c, f, h, w)."""
    seen = []

    def model(x, t, cond):
        seen.append(tuple(x.shape))
        return x * 0.5

    adapter = EDMModel(model, "x0", layout="b f c h w")
    x = torch.randn(2, 3, 5, 4, 4)  # canonical (b, c, f, h, w)
    out = adapter(x, torch.ones(2))
    assert seen == [(2, 5, 3, 4, 4)] and torch.allclose(out, x * 0.5)
    native = torch.randn(2, 5, 3, 4, 4)
    assert torch.equal(adapter.final_x(adapter.initial_x(native, 1.0)), native)
    with pytest.raises(LayoutError, match=r"x_T: layout 'b f c h w' has 5 axes but the tensor has 4 dims"):
        adapter.initial_x(torch.randn(2, 3, 4, 4), 1.0)


def test_model_gets_its_own_time_and_coordinates():
    calls = {}

    def model(x, t, cond):
        calls["x"], calls["t"] = x, t
        return torch.zeros_like(x)

    x, s = noise(2), torch.tensor([0.5, 2.0], dtype=F64)
    FlowModel(model, time_scale=1000.0)(x, s)
    assert torch.allclose(calls["t"], 1000 * s / (1 + s)) and torch.allclose(
        calls["x"], x / (1 + s)[:, None, None, None]
    )
    VPModel(model, ACP)(x, s)
    assert torch.allclose(vp_sigma_from_timestep(calls["t"], ACP), s, rtol=1e-9)
    assert torch.allclose(calls["x"], x / torch.sqrt(1 + s**2)[:, None, None, None])


@pytest.mark.parametrize(
    ("model", "error", "needle"),
    [
        (
            lambda x, t, c: x[:, :1],
            ShapeError,
            r"model output: expected a tensor shaped like the model input \(2, 2, 4, 4\)",
        ),
        (lambda x, t, c: (x,), ShapeError, "got tuple"),
        (lambda x, t, c: x * float("nan"), NonFiniteError, "model output at sigma"),
    ],
)
def test_bad_model_outputs_are_named(model, error, needle):
    with pytest.raises(error, match=needle):
        EDMModel(model)(noise(2), torch.ones(2, dtype=F64))


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: VPModel(lambda x, t, c: x, prediction="flow"), "prediction: expected one of"),
        (lambda: FlowModel(lambda x, t, c: x, time_scale=0), "time_scale"),
        (lambda: VPModel("not a model"), "model: expected a callable"),
        (lambda: adapt(lambda x, t, c: x, "sample"), "prediction: expected one of 'eps', 'v', 'x0', 'flow', 'edm'"),
        (lambda: adapt(lambda x, t, c: x, "flow", alphas_cumprod=ACP), "alphas_cumprod: only used by VP"),
        (lambda: VPModel(lambda x, t, c: x, torch.linspace(0.1, 0.9, 10)), "alphas_cumprod"),
        (lambda: EDMModel(lambda x, t, c: x)(noise(1), torch.full((1,), math.inf)), "finite"),
    ],
)
def test_bad_adapter_arguments_are_named(call, needle):
    with pytest.raises((ConfigError, LayoutError), match=needle):
        call()


def test_adapt_picks_the_adapter():
    f = lambda x, t, c: x  # noqa: E731
    assert isinstance(adapt(f, "eps"), VPModel) and adapt(f, "v").prediction == "v"
    assert isinstance(adapt(f, "flow"), FlowModel) and isinstance(adapt(f, "edm"), EDMModel)
    ready = FlowModel(f)
    assert adapt(ready, "eps") is ready


def test_diffusers_unet_wraps_in_one_lambda():
    """The model-call convention: a diffusers UNet is ``lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample``."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    )  # fmt: skip
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, timestep_spacing="trailing")
    adapter = VPModel(lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample, sched.alphas_cumprod, "eps")
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8)
    sched.set_timesteps(4)
    t = sched.timesteps[1]
    sigma = torch.full((2,), float(((1 - sched.alphas_cumprod[t]) / sched.alphas_cumprod[t]).sqrt()))
    with torch.no_grad():
        ours = adapter.predict(x * torch.sqrt(1 + sigma[0] ** 2), sigma, c)
        ref = unet(x, t, encoder_hidden_states=c).sample
    assert torch.allclose(ours, ref, atol=1e-4)
