"""Loss guidance (DPS, DSG) through the engine's gradient branches.

* On the Gaussian-mixture oracle with a masked, noisy measurement, whose exact posterior is known in closed
  form, DPS samples land at the noise floor of the exact posterior (the unguided prior is ~100x further).
* The step equals the official update written out (DDIM in VP coordinates, ``x_{t-1} -= ζ ∇_{x_t} ‖y − A x̂0‖``)
  in float64, and the gradient the engine takes through the model equals finite differences.
* The correction composes with CFG as its inner strategy and with Interval; bad losses and measurements are
  named errors.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import guidekit as gk
from guidekit.losses import Downsample, Inpaint, MeasurementLoss, sample_norm
from guidekit.ops.spaces import vp_alpha
from guidekit.ops.timesteps import karras_sigmas
from guidekit.oracle import GaussianMixture, energy_distance
from guidekit.samplers import EDMModel, sample_ddim

F64 = torch.float64
GM = GaussianMixture.random(num_classes=1, components=3, event_shape=(1, 4, 4), spread=3.0, std=0.5, seed=1)
MASK = torch.zeros(1, 4, 4, dtype=F64)
MASK[:, :, :2] = 1.0  # the left half is observed
SIGMA_Y = 0.1


def measurement(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x_true = GM.sample(0, 1, generator=g)[0]
    return x_true, MASK * (x_true + SIGMA_Y * torch.randn(x_true.shape, generator=g, dtype=F64))


def noise(n: int, seed: int = 3) -> Tensor:
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=F64)


def dps_samples(strategy: gk.GuidanceStrategy, n: int, steps: int, sampler: str = "ddim", **options) -> Tensor:
    return gk.sample(
        GM.as_model("edm"), noise(n) * 80.0, prediction="edm", sampler=sampler, steps=steps, strategy=strategy,
        cond=torch.zeros(n, dtype=torch.long), uncond=torch.full((n,), -1), progress=False,
        sampler_options=options or None, generator=torch.Generator().manual_seed(4),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("sampler", "options", "within"),
    [("ddim", {"eta": 1.0}, 6.0), ("euler-ancestral", {}, 6.0), ("euler", {}, 40.0), ("dpmpp-2m", {}, 40.0)],
)
def test_dps_reaches_the_exact_posterior_of_a_masked_measurement(sampler, options, within):
    """Stochastic samplers (the paper's DDPM setting) land at the noise floor of the exact posterior; the
    deterministic ones come within ~25x of it (the ODE keeps less of the posterior's spread) and still 100x
    closer than the unguided prior."""
    _, y = measurement()
    n = 400
    exact = GM.sample_masked_posterior(MASK, y, SIGMA_Y, 0, n, generator=torch.Generator().manual_seed(1))
    floor = energy_distance(GM.sample_masked_posterior(MASK, y, SIGMA_Y, 0, n, torch.Generator().manual_seed(9)), exact)
    prior = energy_distance(GM.sample(0, n, generator=torch.Generator().manual_seed(2)), exact)
    loss = MeasurementLoss(Inpaint(MASK[None]), y[None])
    guided = energy_distance(dps_samples(gk.DPS(loss=loss, scale=0.5), n, 50, sampler, **options), exact)
    assert guided < within * floor and guided < prior / 15, (guided, floor, prior)


def test_dps_step_equals_the_official_update_written_out():
    """DDIM (eta = 0) in VP coordinates: x' = sqrt(a') x̂0 + sqrt(1 - a') ε̂; x_{t-1} = x' − ζ ∇_{x_t} ‖y − A x̂0‖."""
    _, y = measurement()
    loss = MeasurementLoss(Inpaint(MASK[None]), y[None])
    sigmas, zeta, n = karras_sigmas(8, 0.002, 80.0), 0.7, 5
    model = EDMModel(GM.as_model("edm"))
    labels = torch.zeros(n, dtype=torch.long)
    ours = sample_ddim(gk.guided(model, gk.DPS(loss=loss, scale=zeta), labels, None), noise(n) * 80.0, sigmas)
    x_vp = noise(n) * 80.0 * vp_alpha(sigmas[0])  # the same start, in VP coordinates
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        a, a_next = vp_alpha(s) ** 2, vp_alpha(s_next) ** 2
        x_t = x_vp.detach().requires_grad_(True)
        x0 = GM.predict(x_t / a.sqrt(), s.expand(n), labels)  # x̂0(x_t): the model at EDM x = x_vp / alpha
        (grad,) = torch.autograd.grad(loss(x0, None).sum(), x_t)
        eps = (x_t / a.sqrt() - x0) / s
        x_vp = (a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps - zeta * grad).detach()
    assert torch.allclose(ours, x_vp, atol=1e-10, rtol=0), float((ours - x_vp).abs().max())


def test_the_engine_gradient_through_the_model_equals_finite_differences():
    _, y = measurement()
    loss = MeasurementLoss(Downsample(2), Downsample(2)(y[None]))
    model = EDMModel(GM.as_model("edm"))
    sigma, n = 2.0, 2
    labels = torch.zeros(n, dtype=torch.long)
    x = noise(n) * sigma
    den = gk.guided(model, gk.DPS(loss=loss, scale=1.0), labels, None)
    info = gk.samplers.StepInfo(0, 1, torch.tensor([sigma, 0.0], dtype=F64))
    out = den(x, torch.full((n,), sigma, dtype=F64), info)
    correction = out.x0 - model.predict(x, torch.full((n,), sigma, dtype=F64), labels)  # x0 is model's x0 here

    def objective(z: Tensor) -> Tensor:
        return loss(GM.predict(z, torch.full((n,), sigma, dtype=F64), labels), None).sum()

    fd = torch.zeros_like(x)
    h = 1e-6
    for idx in range(x[0].numel()):
        e = torch.zeros(x[0].numel(), dtype=F64)
        e[idx] = h
        for b in range(n):
            bump = torch.zeros_like(x)
            bump[b] = e.reshape(x.shape[1:])
            fd[b].view(-1)[idx] = (objective(x + bump) - objective(x - bump)) / (2 * h)
    alpha = vp_alpha(torch.tensor(sigma, dtype=F64))  # the last step: alpha' = 1
    assert torch.allclose(correction, -fd / alpha, atol=1e-7, rtol=1e-6)


def test_dps_composes_with_cfg_and_interval():
    _, y = measurement()
    loss = MeasurementLoss(Inpaint(MASK[None]), y[None])
    n, records = 6, []
    out = gk.sample(
        GM.as_model("edm"), noise(n) * 80.0, prediction="edm", steps=10, cond=torch.zeros(n, dtype=torch.long),
        uncond=torch.full((n,), -1), strategy=gk.Interval(gk.DPS(gk.CFG(2.0), loss=loss, scale=0.5), 0.5, None),
        progress=False, callback=records.append,
    )  # fmt: skip
    assert torch.isfinite(out).all()
    assert records[0].branches == ("cond", "uncond") and records[-1].branches == ("cond",)


def test_dps_corrector_plans_no_gradient_and_direct_calls_are_the_inner_strategy():
    c, u = noise(2, 5), noise(2, 6)
    ctx = gk.GuidanceContext.default(c)
    s = gk.DPS(gk.CFG(3.0), loss=sample_norm)
    assert torch.equal(s(c, u, ctx), gk.CFG(3.0)(c, u, ctx))  # no graph outside the engine
    assert all(b.grad for b in s.branches(ctx, None))
    assert not any(b.grad for b in s.branches(ctx.replace(substep=1), None))


def test_bad_losses_and_measurements_are_named():
    n = 2
    kw = dict(prediction="edm", steps=3, cond=torch.zeros(n, dtype=torch.long), progress=False)
    with pytest.raises(gk.ConfigError, match="loss: expected a loss"):
        gk.sample(GM.as_model("edm"), noise(n), strategy=gk.DPS(), **kw)
    with pytest.raises(gk.ShapeError, match=r"loss: expected one value per sample, shape \(2,\)"):
        gk.sample(GM.as_model("edm"), noise(n), strategy=gk.DPS(loss=lambda x0, ctx: x0.sum()), **kw)
    with pytest.raises(gk.ConfigError, match="loss: expected a value differentiable in x0"):
        gk.sample(GM.as_model("edm"), noise(n), strategy=gk.DPS(loss=lambda x0, ctx: x0.detach().sum((1, 2, 3))), **kw)
    wrong = MeasurementLoss(Inpaint(MASK[None]), torch.zeros(1, 1, 3, 3))
    with pytest.raises(gk.ShapeError, match=r"measurement: expected the shape of A\(x0\)"):
        gk.sample(GM.as_model("edm"), noise(n), strategy=gk.DPS(loss=wrong), **kw)
    with pytest.raises(gk.ConfigError, match="inner: expected a strategy in 'any' or 'x0' space"):
        gk.DPS(gk.TCFG(3.0), loss=sample_norm)
    with pytest.raises(gk.ConfigError, match="mask: expected a tensor of 0"):
        Inpaint(torch.full((1, 4, 4), 0.5))


# -- DSG ------------------------------------------------------------------------------------------------------
def test_dsg_step_equals_the_official_rule_written_out():
    """Per step, VP: DDIM(eta) mean μ and σ_t; g = ∇_{x_t}‖y − A x̂0‖; d* = −r g/‖g‖ with r = sqrt(n) σ_t;
    d_m = σ_t z + g_r (d* − σ_t z); x_{t-1} = μ + r d_m/‖d_m‖ (z from DSG's seeded stream)."""
    _, y = measurement()
    loss = MeasurementLoss(Inpaint(MASK[None]), y[None])
    sigmas, n, g_r, eta, seed = karras_sigmas(6, 0.002, 80.0), 3, 0.3, 1.0, 7
    model = EDMModel(GM.as_model("edm"))
    labels = torch.zeros(n, dtype=torch.long)
    strategy = gk.DSG(loss=loss, guidance_rate=g_r, eta=eta, seed=seed)
    ours = gk.samplers.sample_euler(gk.guided(model, strategy, labels, None), noise(n) * 80.0, sigmas)
    x_vp = noise(n) * 80.0 * vp_alpha(sigmas[0])
    dim = 16
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        a, a_next = vp_alpha(s) ** 2, vp_alpha(s_next) ** 2
        x_t = x_vp.detach().requires_grad_(True)
        x0 = GM.predict(x_t / a.sqrt(), s.expand(n), labels)
        eps = (x_t / a.sqrt() - x0) / s
        sigma_t = eta * torch.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
        mean = a_next.sqrt() * x0 + torch.sqrt((1 - a_next - sigma_t**2).clamp(min=0)) * eps
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i), dtype=F64)
        d_samp = sigma_t * z
        if sigma_t > 0:
            (grad,) = torch.autograd.grad(loss(x0, None).sum(), x_t)
            r = dim**0.5 * sigma_t
            norms = grad.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
            d_star = -r * grad / (norms + 1e-8)
            d_m = d_samp + g_r * (d_star - d_samp)
            d_samp = r * d_m / d_m.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
        x_vp = (mean + d_samp).detach()
    assert torch.allclose(ours, x_vp, atol=1e-9, rtol=0), float((ours - x_vp).abs().max())


def test_dsg_noise_is_reproducible_by_seed():
    _, y = measurement()
    loss = MeasurementLoss(Inpaint(MASK[None]), y[None])
    a = dps_samples(gk.DSG(loss=loss, guidance_rate=0.5, seed=1), 8, 12, "euler")
    b = dps_samples(gk.DSG(loss=loss, guidance_rate=0.5, seed=1), 8, 12, "euler")
    c = dps_samples(gk.DSG(loss=loss, guidance_rate=0.5, seed=2), 8, 12, "euler")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dsg_bad_parameters_are_named():
    with pytest.raises(gk.ConfigError, match="guidance_rate"):
        gk.DSG(loss=sample_norm, guidance_rate=1.5)
    with pytest.raises(gk.ConfigError, match="eta"):
        gk.DSG(loss=sample_norm, eta=0.0)
    with pytest.raises(gk.ConfigError, match="interval: expected an integer >= 1"):
        gk.DSG(loss=sample_norm, interval=0)


@pytest.mark.diffusers
@pytest.mark.parametrize("name", ["dps", "dsg"])
def test_loss_guidance_runs_through_a_diffusers_pipeline(name):
    """Mechanics only: the gradient goes through the pipeline's UNet (under the pipeline's no_grad) and the
    measured half of the latent follows the measurement."""
    pytest.importorskip("diffusers")
    from guidekit.integrations.diffusers import generate
    from guidekit.integrations.diffusers.tiny import tiny_pipeline

    pipe, kw = tiny_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    mask = torch.zeros(1, 1, 2, 2)
    mask[..., 0] = 1.0
    y = mask * torch.full((1, 4, 2, 2), 0.5)
    loss = MeasurementLoss(Inpaint(mask), y)
    guided = {
        "dps": gk.DPS(gk.CFG(3.0), loss=loss, scale=2.0),
        "dsg": gk.DSG(gk.CFG(3.0), loss=loss, guidance_rate=0.5),
    }
    sampler = {"dps": ("ddim", {"eta": 1.0}), "dsg": ("ddim", {"eta": 0.0})}[name]
    residual = {}
    for label, strategy in (("plain", gk.CFG(3.0)), ("guided", guided[name])):
        out = generate(
            pipe, strategy, sampler=sampler[0], sampler_options=sampler[1], num_inference_steps=10, negative_prompt="",
            latents=torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(5)), output_type="latent",
            generator=torch.Generator().manual_seed(1), **kw,
        ).images  # fmt: skip
        residual[label] = float((mask * (out - y)).norm())
    assert residual["guided"] < residual["plain"] / 5, residual


def test_dsg_with_a_zero_gradient_at_full_rate_takes_the_plain_step():
    """Regression: g_r = 1 with a zero gradient (a saturated loss, e.g. a classifier already sure) left
    d_m = 0 and the float32 normalisation made NaN; the step is the plain eta-DDIM step instead."""
    n = 3
    zero = gk.DSG(loss=lambda x0, ctx: (x0 * 0).flatten(1).sum(1), guidance_rate=1.0, seed=1)
    plain = gk.DSG(loss=sample_norm, guidance_rate=0.0, seed=1)
    x_T = noise(n).float() * 80.0
    kw = dict(prediction="edm", sampler="euler", steps=6, cond=torch.zeros(n, dtype=torch.long), progress=False)
    out = gk.sample(GM.as_model("edm"), x_T, strategy=zero, **kw)
    assert torch.allclose(out, gk.sample(GM.as_model("edm"), x_T, strategy=plain, **kw), atol=1e-5)
