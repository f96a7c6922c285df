"""The Gaussian-mixture oracle: exactness (Tweedie, closed forms), samples, metrics, packaging, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from loop_helpers import single_thread  # noqa: F401 - autouse fixture

from guidekit.errors import ConfigError, ShapeError
from guidekit.ops.spaces import flow_t_from_sigma, vp_alpha, vp_sigma
from guidekit.ops.timesteps import betas_linear, vp_timestep_from_sigma
from guidekit.oracle import GaussianMixture, energy_distance

F64 = torch.float64
ACP = torch.cumprod(1 - betas_linear(), 0)


def noisy_marginal(gm: GaussianMixture, a: float, b: float) -> GaussianMixture:
    """The mixture of ``a · x0 + b · eps``: means ``a mu``, stds ``sqrt(a^2 s^2 + b^2)``, same weights."""
    k, m = gm.num_classes, gm.components
    means = (a * gm.means).reshape(k, m, *gm.event_shape)
    stds = torch.sqrt(a**2 * gm.stds**2 + b**2).reshape(k, m)
    return GaussianMixture(means, stds, gm.weights, gm.class_prior)


@given(
    sigma=st.floats(0.05, 20.0),
    label=st.integers(-1, 2),
    seed=st.integers(0, 1000),
    shape=st.sampled_from([(3,), (2, 3, 3), (2, 2, 2, 2)]),
)
def test_eps_is_the_scaled_score(sigma, label, seed, shape):
    """Tweedie: E[eps | x] = -b ∇ log p_t(x), checked by autograd through the noisy marginal's density."""
    g = torch.Generator().manual_seed(seed)
    means = GaussianMixture.random(3, 2, shape, spread=2.0, seed=seed).means.reshape(3, 2, *shape)
    stds, weights = torch.rand(3, 2, generator=g, dtype=F64) * 0.5 + 0.2, torch.rand(3, 2, generator=g, dtype=F64) + 0.1
    gm = GaussianMixture(means, stds, weights)
    s = torch.tensor(sigma, dtype=F64)
    a, b = float(vp_alpha(s)), float(vp_sigma(s))
    x = (torch.randn(5, *shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * 1.5).requires_grad_(True)
    labels = torch.full((5,), label)
    score = torch.autograd.grad(noisy_marginal(gm, a, b).log_prob(x, labels).sum(), x)[0]
    x0 = gm.posterior_x0(x.detach(), torch.tensor(a, dtype=F64), torch.tensor(b, dtype=F64), labels)
    eps = (x.detach() - a * x0) / b
    assert torch.allclose(eps, -b * score, atol=1e-9)


def test_single_gaussian_closed_form():
    gm = GaussianMixture(torch.full((1, 1, 4), 2.0, dtype=F64), 0.5)
    x = torch.randn(6, 4, dtype=F64)
    a, b = torch.tensor(0.6, dtype=F64), torch.tensor(0.8, dtype=F64)
    expected = 2.0 + a * 0.25 / (a**2 * 0.25 + b**2) * (x - a * 2.0)
    assert torch.allclose(gm.posterior_x0(x, a, b, torch.zeros(6)), expected, atol=1e-12)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0", "flow", "edm"])
def test_native_models_are_the_same_oracle(prediction):
    """as_model(...) in the model's own coordinates and time agrees with predict(...) at EDM (x, sigma)."""
    gm = GaussianMixture.random(3, 2, (2, 3, 3), seed=4)
    sigma = torch.tensor([0.1, 0.7, 3.0, 12.0], dtype=F64)
    x = torch.randn(4, 2, 3, 3, dtype=F64) * torch.sqrt(1 + sigma**2)[:, None, None, None]
    labels = torch.tensor([0, 1, 2, -1])
    r = sigma[:, None, None, None]
    if prediction == "flow":
        native_x, t = x / (1 + r), flow_t_from_sigma(sigma)
    elif prediction == "edm":
        native_x, t = x, sigma
    else:
        native_x, t = x / torch.sqrt(1 + r**2), vp_timestep_from_sigma(sigma, ACP)
    space = "x0" if prediction == "edm" else prediction
    out = gm.as_model(prediction)(native_x, t, labels)
    assert torch.allclose(out, gm.predict(x, sigma, labels, space), atol=1e-9)


def test_prediction_at_infinite_sigma_is_the_prior_mean():
    gm = GaussianMixture.random(3, 2, (5,), seed=2)
    x = torch.randn(3, 5, dtype=F64)
    inf = torch.full((3,), math.inf, dtype=F64)
    cond = gm.predict(x, inf, torch.tensor([0, 1, -1]))
    class_means = (gm.weights[:, :, None] * gm.means.reshape(3, 2, 5)).sum(1)
    assert torch.allclose(cond[0], class_means[0]) and torch.allclose(cond[1], class_means[1])
    assert torch.allclose(cond[2], (gm.class_prior[:, None] * class_means).sum(0))
    assert torch.allclose(gm.predict(x, inf, torch.tensor([0, 1, -1]), "flow"), x - cond)


def test_exact_samples_have_the_mixture_moments():
    gm = GaussianMixture(torch.tensor([[[-2.0, 0.0], [2.0, 1.0]]], dtype=F64), torch.tensor([[0.5, 1.0]]),
                         torch.tensor([[1.0, 3.0]]))  # fmt: skip
    x = gm.sample(0, 40000, generator=torch.Generator().manual_seed(0))
    mean = 0.25 * torch.tensor([-2.0, 0.0]) + 0.75 * torch.tensor([2.0, 1.0])
    second = 0.25 * (torch.tensor([4.0, 0.0]) + 0.25) + 0.75 * (torch.tensor([4.0, 1.0]) + 1.0)
    assert torch.allclose(x.mean(0), mean.double(), atol=0.03)
    assert torch.allclose((x**2).mean(0), second.double(), atol=0.06)


def test_unconditional_samples_follow_the_class_prior():
    gm = GaussianMixture(torch.tensor([[[-5.0]], [[5.0]]], dtype=F64), 0.1, class_prior=torch.tensor([0.2, 0.8]))
    x = gm.sample(-1, 20000, generator=torch.Generator().manual_seed(1))
    assert float((x > 0).double().mean()) == pytest.approx(0.8, abs=0.01)
    assert torch.allclose(gm.class_posterior(x, (x[:, 0] > 0).long()), torch.ones(20000, dtype=F64))


def test_class_posterior_is_a_distribution():
    gm = GaussianMixture.random(3, 2, (2,), spread=1.0, std=0.8, seed=5)
    x = torch.randn(50, 2, dtype=F64)
    total = sum(gm.class_posterior(x, torch.full((50,), k)) for k in range(3))
    assert torch.allclose(total, torch.ones(50, dtype=F64))


def test_energy_distance_properties():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 4, generator=g, dtype=F64), torch.randn(300, 4, generator=g, dtype=F64)
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert energy_distance(x, y) == pytest.approx(energy_distance(y, x))
    small, shifted = energy_distance(x, y), energy_distance(x, y + 0.5)
    assert 0 < small < shifted
    with pytest.raises(ShapeError, match="y: expected 4 features"):
        energy_distance(x, torch.randn(5, 3))


def test_projection_keeps_what_separates_the_classes():
    gm = GaussianMixture.random(3, 2, (2, 8, 8), seed=3)
    basis = gm.mean_basis()
    assert basis.shape == (128, 6) and torch.allclose(basis.T @ basis, torch.eye(6, dtype=F64), atol=1e-12)
    a, b = gm.sample(0, 500, generator=torch.Generator().manual_seed(0)), gm.sample(1, 500)
    assert energy_distance(gm.project(a), gm.project(b)) > energy_distance(a, b) * 0.9


@pytest.mark.parametrize(
    ("call", "error", "needle"),
    [
        (lambda: GaussianMixture(torch.zeros(3, 2)), ShapeError, "means: expected"),
        (lambda: GaussianMixture(torch.zeros(1, 2, 3), -1.0), ConfigError, "stds: expected positive"),
        (lambda: GaussianMixture(torch.zeros(1, 2, 3), weights=torch.ones(2, 2)), ConfigError, "weights"),
        (lambda: GaussianMixture(torch.zeros(2, 1, 3), class_prior=torch.ones(3)), ConfigError, "class_prior"),
        (lambda: GaussianMixture.random().sample(5, 3), ConfigError, r"labels: expected -1 \(uncond\) or 0..2"),
        (lambda: GaussianMixture.random().predict(torch.zeros(2, 3), torch.ones(2), torch.zeros(2)), ShapeError, "x"),
        (lambda: GaussianMixture.random().as_model("score"), ConfigError, "prediction"),
    ],
)
def test_bad_oracle_input_is_named(call, error, needle):
    with pytest.raises(error, match=needle):
        call()
