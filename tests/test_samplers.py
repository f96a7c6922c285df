"""Samplers and schedules: convergence on the analytic oracle, equivalences, diffusers references, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from loop_helpers import distances, mixture, noise, single_thread  # noqa: F401 - autouse fixture

import guidekit as gk
from guidekit.errors import ConfigError, ShapeError, UnknownNameError
from guidekit.ops.spaces import sigma_from_alphas_cumprod
from guidekit.ops.timesteps import betas_scaled_linear, vp_sigma_from_timestep, vp_timesteps
from guidekit.registry import SAMPLERS
from guidekit.samplers import (
    Denoised,
    StepInfo,
    flow_sigmas,
    flow_times,
    karras_sigmas,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_flow_euler,
    sample_heun,
    vp_sigmas,
)

F64 = torch.float64
N = 2000
LABELS = torch.zeros(N, dtype=torch.long)


def oracle_denoiser(sigma_error: float = 1.0):
    """The exact class-0 denoiser; ``sigma_error != 1`` evaluates it at a wrong noise level (a broken model)."""
    gm = mixture()
    return lambda x, sigma, info: gm.predict(x, sigma * sigma_error, LABELS[: x.shape[0]])


def start(sigmas: torch.Tensor, n: int = N) -> torch.Tensor:
    return noise(n) * (sigmas[0] if torch.isfinite(sigmas[0]) else 1.0)


# -- convergence at w = 1 --------------------------------------------------------------------------------
# (sampler, steps, options, schedule). Measured with N = 2000, D = 32 (3 classes x 2 components), floor =
# mean of 4 exact-vs-exact draws (full 0.0046, projected 0.0022); good runs land at 0.9-2.1x the floor,
# the same runs with the noise level off by 25% at 3.6-12x.
CASES = [
    ("euler", 50, {}, "karras"),
    ("ddim", 50, {}, "karras"),
    ("heun", 25, {}, "karras"),
    ("dpmpp-2m", 25, {}, "karras"),
    ("flow-euler", 50, {}, "flow"),
    ("euler-ancestral", 100, {}, "karras"),
    ("ddim", 100, {"eta": 1.0}, "karras"),
    ("heun", 50, {"s_churn": 20.0}, "karras"),
]


def run_case(name: str, steps: int, options: dict, schedule: str, sigma_error: float = 1.0) -> torch.Tensor:
    sigmas = karras_sigmas(steps, 0.002, 80.0) if schedule == "karras" else flow_sigmas(steps)
    gen = torch.Generator().manual_seed(3)
    return SAMPLERS.get(name)(oracle_denoiser(sigma_error), start(sigmas), sigmas, generator=gen, **options)


@pytest.mark.parametrize(("name", "steps", "options", "schedule"), CASES, ids=lambda v: str(v))
def test_sampler_reaches_the_noise_floor(name, steps, options, schedule):
    full, projected = distances(run_case(name, steps, options, schedule))
    assert full < 3.0, f"energy distance {full:.2f}x the floor"
    assert projected < 3.0, f"projected energy distance {projected:.2f}x the floor"


@pytest.mark.parametrize(("name", "steps", "options", "schedule"), CASES, ids=lambda v: str(v))
def test_convergence_check_catches_a_wrong_noise_level(name, steps, options, schedule):
    full, projected = distances(run_case(name, steps, options, schedule, sigma_error=1.25))
    assert max(full, projected) > 3.0


def test_convergence_check_catches_a_truncated_sampler():
    """A sampler that returns at sigma ~ 0.5 instead of 0 leaves visible noise (measured: 25x the floor).

    The metric's blind spot, measured: residual noise below sigma ~ 0.2 (components of std 0.5) stays
    within 2.2x the floor."""
    sigmas = karras_sigmas(50, 0.002, 80.0)
    seen = []
    sample_euler(oracle_denoiser(), start(sigmas), sigmas, callback=seen.append)
    early = next(s for s in seen if s.sigma_next < 0.6)
    assert max(distances(early.x)) > 3.0


# -- equivalences ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["karras", "flow"])
def test_ddim_euler_and_flow_euler_are_one_update(schedule):
    """DDIM (eta = 0) = Euler in EDM sigma = flow-matching Euler (methods.md §2), to float64 accuracy."""
    sigmas = karras_sigmas(12, 0.002, 80.0) if schedule == "karras" else flow_sigmas(12, shift=3.0)
    x = start(sigmas, 64)
    den = oracle_denoiser()
    a, b, c = sample_ddim(den, x, sigmas), sample_euler(den, x, sigmas), sample_flow_euler(den, x, sigmas)
    assert torch.allclose(a, b, rtol=0, atol=1e-9) and torch.allclose(b, c, rtol=0, atol=1e-9)


def test_ddim_eta_one_is_euler_ancestral():
    """DDIM's eta = 1 noise (eq. 16) and k-diffusion's ancestral split are the same DDPM posterior step."""
    sigmas = karras_sigmas(10, 0.002, 80.0)
    x = start(sigmas, 64)
    a = sample_ddim(oracle_denoiser(), x, sigmas, eta=1.0, generator=torch.Generator().manual_seed(5))
    b = sample_euler_ancestral(oracle_denoiser(), x, sigmas, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(a, b, rtol=0, atol=1e-9)


def test_first_steps_agree_across_samplers():
    """DDIM, Euler and DPM-Solver++(2M) take the same first (first-order) step."""
    sigmas = karras_sigmas(8, 0.002, 80.0)
    x = start(sigmas, 16)
    firsts = []
    for sampler in (sample_ddim, sample_dpmpp_2m, sample_euler):
        seen = []
        sampler(oracle_denoiser(), x, sigmas, callback=seen.append)
        firsts.append(seen[0].x)
    assert all(torch.allclose(f, firsts[0], rtol=0, atol=1e-10) for f in firsts)


def test_heun_corrector_is_substep_one_and_last_step_is_euler():
    calls = []

    def spy(x, sigma, info):
        calls.append((info.step, info.substep, float(sigma[0])))
        return mixture().predict(x, sigma, LABELS[: x.shape[0]])

    sigmas = karras_sigmas(6, 0.002, 80.0)
    sample_heun(spy, start(sigmas, 4), sigmas)
    assert len(calls) == 2 * 6 - 1
    for step in range(5):
        assert (step, 0, pytest.approx(float(sigmas[step]))) in calls
        assert (step, 1, pytest.approx(float(sigmas[step + 1]))) in calls
    assert [c for c in calls if c[0] == 5] == [(5, 0, pytest.approx(float(sigmas[5])))]


def test_infinite_first_sigma_is_its_limit():
    """A flow schedule from t = 1 (sigma = inf) equals the limit of schedules from t -> 1 (x holds x / sigma)."""
    den = oracle_denoiser()
    x = noise(32)
    near = flow_sigmas(8, t_max=1 - 1e-9, t_min=1 / 8)
    for sampler, atol in (
        (sample_euler, 1e-6),
        (sample_ddim, 1e-6),
        (sample_flow_euler, 1e-6),
        (sample_dpmpp_2m, 1e-2),
    ):
        exact = sampler(den, x, flow_sigmas(8))
        assert torch.allclose(exact, sampler(den, x * near[0], near), atol=atol), sampler.__name__
    # Heun's trapezoid is undefined over an infinite step: its first step from inf is Euler's.
    heun, euler = [], []
    sample_heun(den, x, flow_sigmas(8), callback=heun.append)
    sample_euler(den, x, flow_sigmas(8), callback=euler.append)
    assert torch.allclose(heun[0].x, euler[0].x, rtol=0, atol=1e-12) and torch.isfinite(heun[-1].x).all()


def test_renoise_output_steps_along_the_given_eps():
    """A Denoised(x0, eps) output makes first-order samplers compute x0 + sigma_next * eps (CFG++ hook)."""
    eps_dir = noise(8, seed=3)
    target = noise(8, seed=4)
    den = lambda x, sigma, info: Denoised(target, eps_dir)  # noqa: E731
    sigmas = torch.tensor([5.0, 2.0, 0.0], dtype=F64)
    for sampler in (sample_euler, sample_ddim, sample_flow_euler, sample_dpmpp_2m):
        seen = []
        sampler(den, noise(8) * 5, sigmas, callback=seen.append)
        assert torch.allclose(seen[0].x, target + 2.0 * eps_dir, atol=1e-12), sampler.__name__


@pytest.mark.parametrize("name", ["euler-ancestral", "ddim"])
def test_per_sample_generators_make_samples_batch_independent(name):
    sigmas = karras_sigmas(6, 0.002, 80.0)
    x = start(sigmas, 4)
    opts = {"eta": 1.0}
    gens = [torch.Generator().manual_seed(10 + i) for i in range(4)]
    batch = SAMPLERS.get(name)(oracle_denoiser(), x, sigmas, generator=gens, **opts)
    alone = SAMPLERS.get(name)(oracle_denoiser(), x[2:3], sigmas, generator=[torch.Generator().manual_seed(12)], **opts)
    assert torch.allclose(batch[2:3], alone, atol=1e-12)
    other = SAMPLERS.get(name)(oracle_denoiser(), x, sigmas, generator=torch.Generator().manual_seed(1), **opts)
    assert not torch.allclose(batch, other)


# -- diffusers references --------------------------------------------------------------------------------
diffusers = pytest.importorskip("diffusers")


def _eps_oracle(acp: torch.Tensor):
    return mixture().as_model("eps", alphas_cumprod=acp)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_vp_timesteps_match_diffusers_ddim(spacing):
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", timestep_spacing=spacing, steps_offset=1)
    sched.set_timesteps(20)
    ours = vp_timesteps(1000, 20, spacing, steps_offset=1)
    if spacing == "linspace":
        ours = ours.round()
    assert ours.long().tolist() == sched.timesteps.tolist()


@pytest.mark.parametrize(("eta", "spacing"), [(0.0, "trailing"), (0.0, "leading"), (1.0, "trailing")])
def test_ddim_matches_diffusers_ddim_scheduler(eta, spacing):
    sched = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", clip_sample=False, timestep_spacing=spacing, set_alpha_to_one=True
    )
    sched.set_timesteps(10)
    acp = sched.alphas_cumprod.to(F64)
    model = _eps_oracle(acp)
    labels = LABELS[:16]
    x = noise(16)
    gen = torch.Generator().manual_seed(0)
    zs = [torch.randn(x.shape, generator=gen, dtype=F64) for _ in range(10)]
    ref = x.clone()
    for i, t in enumerate(sched.timesteps):
        eps = model(ref, t.to(F64).expand(16), labels)
        ref = sched.step(eps, t, ref, eta=eta, variance_noise=zs[i]).prev_sample
    sigmas = torch.cat([sigma_from_alphas_cumprod(acp[sched.timesteps]), torch.zeros(1, dtype=F64)])
    ours = gk.sample(
        model, x, sampler="ddim", schedule=sigmas, cond=labels, layout="b c h w",
        alphas_cumprod=acp, sampler_options={"eta": eta}, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert torch.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_dpmpp_2m_matches_diffusers_dpm_solver_multistep(spacing):
    """Ours (k-diffusion form, EDM sigma) == diffusers' DPMSolverMultistep(dpmsolver++, order 2) in VP form."""
    sched = diffusers.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++", solver_order=2, timestep_spacing=spacing, final_sigmas_type="zero"
    )
    sched.set_timesteps(10)
    acp = sched.alphas_cumprod.to(F64)
    model = _eps_oracle(acp)
    labels, x = LABELS[:16], noise(16)
    ref = x.clone()
    for t in sched.timesteps:
        ref = sched.step(model(ref, t.to(F64).expand(16), labels), t, ref).prev_sample
    sigmas = torch.cat([sigma_from_alphas_cumprod(acp[sched.timesteps]), torch.zeros(1, dtype=F64)])
    ours = gk.sample(model, x, sampler="dpmpp-2m", schedule=sigmas, cond=labels, alphas_cumprod=acp)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_euler_matches_diffusers_euler_discrete():
    sched = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", use_karras_sigmas=True)
    sched.set_timesteps(12)
    acp = sched.alphas_cumprod.to(F64)
    model = _eps_oracle(acp)
    labels = LABELS[:16]
    x = noise(16) * sched.init_noise_sigma
    ref = x.clone()
    for t in sched.timesteps:
        inp = sched.scale_model_input(ref, t)
        ref = sched.step(model(inp, t.to(F64).expand(16), labels), t, ref).prev_sample
    sigmas = sched.sigmas.to(F64)
    ours = sample_euler(lambda x, s, i: gk.samplers.VPModel(model, acp)(x, s, cond=labels), x, sigmas)
    assert torch.allclose(ours, ref, atol=1e-4)


def test_flow_euler_matches_diffusers_flow_match_euler():
    n, shift = 10, 3.0
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=torch.linspace(1, 1 / n, n).tolist())
    assert torch.allclose(sched.sigmas.to(F64), flow_times(n, shift=shift), atol=1e-6)
    model = mixture().as_model("flow", time_scale=1000.0)
    labels = LABELS[:16]
    x = noise(16)
    ref = x.clone()
    for t in sched.timesteps:
        ref = sched.step(model(ref, t.to(F64).expand(16), labels), t, ref).prev_sample
    ours = gk.sample(model, x, sampler="flow-euler", prediction="flow", time_scale=1000.0, steps=n,
                     schedule=flow_sigmas(n, shift=shift), cond=labels)  # fmt: skip
    assert torch.allclose(ours, ref, atol=1e-5)


# -- schedules -------------------------------------------------------------------------------------------
def test_karras_matches_the_edm_grid():
    """The guidance-interval paper's grid (methods.md §6): 32 steps, sigma_17 = 1.609, sigma_22 = 0.283."""
    s = karras_sigmas(32, 0.002, 80.0)
    assert float(s[17]) == pytest.approx(1.609, abs=1e-3) and float(s[22]) == pytest.approx(0.283, abs=1e-3)
    assert float(s[0]) == pytest.approx(80.0) and float(s[31]) == pytest.approx(0.002) and s[32] == 0


@given(
    steps=st.integers(1, 60),
    lo=st.floats(1e-3, 1.0),
    ratio=st.floats(1.5, 1e4),
    rho=st.floats(1.0, 10.0),
    shift=st.floats(0.3, 8.0),
    spacing=st.sampled_from(["leading", "trailing", "linspace"]),
)
def test_every_schedule_decreases_to_zero(steps, lo, ratio, rho, shift, spacing):
    acp = torch.cumprod(1 - betas_scaled_linear(), 0)
    for sigmas in (
        karras_sigmas(steps, lo, lo * ratio, rho),
        flow_sigmas(steps, shift=shift),
        vp_sigmas(acp, steps, spacing),
    ):
        assert sigmas.shape == (steps + 1,) and sigmas[-1] == 0
        assert bool((sigmas[:-1] > sigmas[1:]).all())
    assert math.isinf(float(flow_sigmas(steps, shift=shift)[0]))
    t = vp_timesteps(1000, steps, spacing)
    assert torch.allclose(vp_sigmas(acp, steps, spacing)[:-1], vp_sigma_from_timestep(t, acp))


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: karras_sigmas(0), "steps"),
        (lambda: karras_sigmas(5, 2.0, 1.0), "sigma_min"),
        (lambda: flow_sigmas(5, shift=0.0), "shift"),
        (lambda: flow_sigmas(5, t_max=1.5), "t_max"),
        (lambda: vp_sigmas(torch.linspace(0.9, 0.1, 10), 20), "steps"),
        (lambda: vp_sigmas(torch.linspace(0.1, 0.9, 10), 5), "alphas_cumprod"),
        (lambda: vp_sigmas(torch.linspace(0.9, 0.1, 10), 5, "middle"), "spacing"),
    ],
)
def test_bad_schedule_arguments_are_named(call, needle):
    with pytest.raises(ConfigError, match=needle):
        call()


# -- errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sigmas", "needle"),
    [
        ([1.0, 2.0, 0.0], "strictly decreasing"),
        ([2.0, 1.0, 0.5], "end at 0"),
        ([2.0, float("nan"), 0.0], "NaN"),
        ([2.0, float("inf"), 0.0], "strictly decreasing"),
        ([0.0], "at least 2"),
    ],
)
def test_bad_sigmas_are_refused(sigmas, needle):
    with pytest.raises((ConfigError, ShapeError), match=needle):
        sample_euler(oracle_denoiser(), noise(2), torch.tensor(sigmas, dtype=F64))


def test_denoiser_of_the_wrong_shape_is_refused():
    with pytest.raises(ShapeError, match=r"denoiser output: expected shape \(2, 2, 4, 4\)"):
        sample_euler(lambda x, s, i: x[:, :1], noise(2), karras_sigmas(3))


def test_unknown_sampler_lists_the_known_ones():
    with pytest.raises(UnknownNameError) as err:
        SAMPLERS.get("eular")
    message = str(err.value)
    assert "did you mean 'euler'" in message
    for name in ("ddim", "euler", "euler-ancestral", "heun", "dpmpp-2m", "flow-euler"):
        assert name in message


def test_registry_holds_the_builtins():
    assert {"ddim", "euler", "euler-ancestral", "heun", "dpmpp-2m", "flow-euler"} <= set(gk.samplers.names())
    assert gk.samplers.get("heun") is sample_heun


def test_step_info_sigma_next():
    sigmas = karras_sigmas(4)
    assert StepInfo(2, 4, sigmas).sigma_next == sigmas[3]


@pytest.mark.parametrize("eta", [-0.5, 1.5])
def test_ddim_eta_out_of_range(eta):
    with pytest.raises(ConfigError, match="eta"):
        sample_ddim(oracle_denoiser(), noise(2), karras_sigmas(3), eta=eta)
