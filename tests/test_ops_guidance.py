"""Algebraic properties of the pure guidance math (guidekit.ops.guidance): CFG, projection, APG, rescale,
the per-sample reductions, and the pair check they run on their inputs."""

from __future__ import annotations

import pytest
import torch
from gen import examples, make_pair, pred_pairs, shapes
from hypothesis import given
from hypothesis import strategies as st

from guidekit.errors import ShapeError
from guidekit.ops.checks import check_pair
from guidekit.ops.guidance import (
    apg,
    apg_from_delta,
    cfg,
    momentum_update,
    per_sample_dot,
    per_sample_norm,
    project,
    rescale_std,
)

scales = st.floats(-3.0, 20.0, allow_nan=False)
fractions = st.floats(0.0, 1.0)


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10) -> bool:
    scale = max(float(b.abs().max()), 1e-30) if b.numel() else 1.0
    return bool(((a - b).abs() <= rtol * (b.abs() + scale)).all())


def reference_apg(c: torch.Tensor, u: torch.Tensor, w: float, eta: float, r: float) -> torch.Tensor:
    """Algorithm 1 of the APG paper, literally (in float64)."""
    delta = c - u
    if r > 0:
        norm = per_sample_norm(delta)
        delta = delta * per_sample(torch.clamp(r / norm, max=1.0), delta)
    par, orth = project(delta, c)
    return c + (w - 1) * (orth + eta * par)


# -- CFG ----------------------------------------------------------------------------------------------
@given(ex=examples(), w=scales)
def test_cfg_is_affine_in_scale_with_exact_endpoints(ex, w):
    c, u = ex.pred_cond, ex.pred_uncond
    assert torch.equal(cfg(c, u, 1.0), c)
    assert torch.equal(cfg(c, u, 0.0), u)
    assert close(cfg(c, u, w), u + w * (c - u), 1e-12)


@given(ex=examples())
def test_cfg_with_a_scale_map_is_elementwise(ex):
    c, u = ex.pred_cond, ex.pred_uncond
    gen = torch.Generator().manual_seed(0)
    scale_map = 1 + 10 * torch.rand((c.shape[0], 1, *c.shape[2:]), generator=gen, dtype=torch.float64)
    assert close(cfg(c, u, scale_map), u + scale_map * (c - u), 1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cfg_half_precision_is_computed_in_float32(dtype):
    c, u = make_pair((2, 3, 4, 5), "independent", seed=3, dtype=dtype)
    out = cfg(c, u, 7.5)
    assert out.dtype == dtype
    assert torch.equal(out, torch.lerp(u.float(), c.float(), 7.5).to(dtype))


# -- projection -----------------------------------------------------------------------------------------
@given(ex=examples())
def test_project_splits_into_parallel_and_orthogonal_parts(ex):
    x, onto = ex.pred_cond - ex.pred_uncond, ex.pred_cond
    par, orth = project(x, onto)
    assert close(par + orth, x, 1e-12)
    # orthogonal to `onto`, relative to the sizes involved
    bound = 1e-10 * per_sample_norm(x) * per_sample_norm(onto) + 1e-300
    assert bool((per_sample_dot(orth, onto).abs() <= bound).all())
    # parallel: par = k * onto per sample, so par is unchanged by projecting again (idempotent)
    par2, orth2 = project(par, onto)
    assert close(par2, par, 1e-10)
    assert bool((per_sample_norm(orth2) <= 1e-10 * (per_sample_norm(par) + 1e-300)).all())


def test_project_onto_zero_has_no_parallel_part():
    x, onto = make_pair((2, 3, 4, 4), "independent", seed=1)
    onto[1] = 0.0
    par, orth = project(x, onto)
    assert torch.equal(par[1], torch.zeros_like(par[1]))
    assert torch.equal(orth[1], x[1])


@given(shape=shapes("b c f h w"), data=st.data())
def test_project_keeps_dtype_and_is_per_sample(shape, data):
    x, onto = data.draw(pred_pairs(shape, torch.float32))
    par, orth = project(x, onto)
    assert par.dtype == orth.dtype == torch.float32
    single = [project(x[i : i + 1], onto[i : i + 1]) for i in range(shape[0])]
    assert torch.allclose(par, torch.cat([p for p, _ in single]), rtol=1e-6, atol=1e-6 * float(x.abs().max()))


# -- APG ------------------------------------------------------------------------------------------------
@given(
    ex=examples(),
    w=scales,
    eta=fractions,
    r=st.one_of(st.just(0.0), st.floats(1e-3, 50.0)),
)
def test_apg_closed_form_equals_the_papers_algorithm(ex, w, eta, r):
    c, u = ex.pred_cond, ex.pred_uncond
    assert close(apg(c, u, w, eta, r), reference_apg(c, u, w, eta, r), 1e-9)


@given(ex=examples(), w=scales)
def test_apg_with_eta_one_and_no_threshold_is_cfg(ex, w):
    c, u = ex.pred_cond, ex.pred_uncond
    assert close(apg(c, u, w, eta=1.0, norm_threshold=0.0), u + w * (c - u), 1e-9)


@given(ex=examples(), eta=fractions, r=st.floats(0.0, 50.0))
def test_apg_scale_one_is_pred_cond(ex, eta, r):
    assert torch.equal(apg(ex.pred_cond, ex.pred_uncond, 1.0, eta, r), ex.pred_cond)


@given(ex=examples(), w=scales)
def test_apg_without_parallel_part_moves_orthogonally_to_pred_cond(ex, w):
    c, u = ex.pred_cond, ex.pred_uncond
    step = apg(c, u, w, eta=0.0, norm_threshold=0.0) - c
    # relative to the guidance term |w - 1| ||c - u|| ||c||, plus the rounding of the output itself (~eps ||c||²)
    size = abs(w - 1) * per_sample_norm(c - u) + per_sample_norm(c) * 1e-3
    bound = 1e-10 * size * per_sample_norm(c) + 1e-300
    assert bool((per_sample_dot(step, c).abs() <= bound).all())


@given(ex=examples(), w=scales, eta=fractions, r=st.floats(1e-3, 50.0))
def test_apg_update_norm_is_capped_by_the_threshold(ex, w, eta, r):
    c, u = ex.pred_cond, ex.pred_uncond
    step = apg(c, u, w, eta, r) - c
    assert bool((per_sample_norm(step) <= abs(w - 1) * r * (1 + 1e-9) + 1e-12).all())


@given(ex=examples(), w=scales, eta=fractions, r=st.floats(0.0, 50.0))
def test_apg_from_delta_with_c_minus_u_is_apg(ex, w, eta, r):
    c, u = ex.pred_cond, ex.pred_uncond
    assert torch.equal(apg_from_delta(c, c - u, w, eta, r), apg(c, u, w, eta, r))


def test_apg_zero_pred_cond_sample_has_no_parallel_part():
    c, u = make_pair((2, 3, 4, 5), "correlated", seed=4)
    c[0] = 0.0
    out = apg(c, u, 5.0, eta=0.0, norm_threshold=0.0)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0], 4.0 * (c[0] - u[0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_apg_low_precision_matches_float64_within_its_precision(dtype):
    c, u = make_pair((2, 4, 8, 8), "correlated", seed=5)
    out = apg(c.to(dtype), u.to(dtype), 7.0, 0.2, 5.0)
    ref = apg(c.to(dtype).double(), u.to(dtype).double(), 7.0, 0.2, 5.0)
    assert out.dtype == dtype
    tol = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    assert torch.allclose(out.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


@given(ex=examples(), beta=st.floats(-0.9, 0.9))
def test_momentum_update_is_delta_plus_beta_running(ex, beta):
    delta, running = ex.pred_cond, ex.pred_uncond
    assert close(momentum_update(delta, running, beta), delta + beta * running, 1e-14)


# -- guidance rescale -----------------------------------------------------------------------------------
def std(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).std(dim=1)


@given(ex=examples(), w=st.floats(1.5, 15.0))
def test_rescale_phi_zero_is_identity_and_phi_one_matches_cond_std(ex, w):
    c, u = ex.pred_cond, ex.pred_uncond
    guided = cfg(c, u, w)
    assert torch.equal(rescale_std(guided, c, 0.0), guided)
    out = rescale_std(guided, c, 1.0)
    moved = std(guided) > 1e-6 * guided.flatten(1).abs().amax(1)  # not a constant sample
    assert torch.allclose(std(out)[moved], std(c)[moved], rtol=1e-9, atol=1e-300)


@given(ex=examples(), w=st.floats(1.5, 15.0), phi=fractions)
def test_rescale_is_affine_in_phi(ex, w, phi):
    c, u = ex.pred_cond, ex.pred_uncond
    guided = cfg(c, u, w)
    lo, hi = rescale_std(guided, c, 0.0), rescale_std(guided, c, 1.0)
    assert close(rescale_std(guided, c, phi), lo + phi * (hi - lo), 1e-9)


@given(ex=examples(), phi=fractions, a=st.floats(1e-3, 1e3))
def test_rescale_of_the_conditional_is_identity_and_scale_covariant(ex, phi, a):
    c, u = ex.pred_cond, ex.pred_uncond
    assert torch.equal(rescale_std(c, c, phi), c)
    guided = cfg(c, u, 5.0)
    assert close(rescale_std(a * guided, a * c, phi), a * rescale_std(guided, c, phi), 1e-9)


def test_rescale_leaves_constant_samples_unchanged():
    c, u = make_pair((3, 2, 4, 4), "correlated", seed=6)
    guided = cfg(c, u, 4.0)
    guided[1] = 2.5  # constant: std 0 (or rounding-level)
    guided[2] = 0.0
    out = rescale_std(guided, c, 0.7)
    assert torch.equal(out[1:], guided[1:])
    single = rescale_std(torch.full((1, 1, 1, 1), 3.0), torch.full((1, 1, 1, 1), 1.0), 0.7)  # std undefined
    assert torch.equal(single, torch.full((1, 1, 1, 1), 3.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rescale_keeps_dtype(dtype):
    c, u = make_pair((2, 4, 6, 6), "correlated", seed=7, dtype=dtype)
    assert rescale_std(cfg(c, u, 7.5), c, 0.7).dtype == dtype


# -- input checks and per-sample reductions -------------------------------------------------------------
def test_check_pair_names_the_mismatch():
    c = torch.zeros(2, 3, 4)
    with pytest.raises(ShapeError, match=r"pred_uncond: expected the shape of pred_cond \(2, 3, 4\), got \(2, 3\)"):
        check_pair(c, torch.zeros(2, 3))
    with pytest.raises(ShapeError, match=r"pred_uncond: expected dtype torch\.float32"):
        check_pair(c, c.double())
    with pytest.raises(ShapeError, match="at least 2 dims"):
        check_pair(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ShapeError, match="expected the shape"):
        project(c, torch.zeros(2, 3, 5))


@given(ex=examples())
def test_per_sample_reductions_run_over_all_non_batch_dims(ex):
    x, y = ex.pred_cond, ex.pred_uncond
    assert close(per_sample_dot(x, y), (x.flatten(1) * y.flatten(1)).sum(1), 1e-12)
    assert close(per_sample_norm(x), x.flatten(1).norm(dim=1), 1e-12)
