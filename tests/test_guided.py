"""The guided loop: CFG by hand, NFE accounting, state per step, hooks, records, conditions, errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from loop_helpers import mixture, noise, single_thread  # noqa: F401 - autouse fixture

import guidekit as gk
from guidekit.errors import ConfigError, LayoutError, NonFiniteError, ShapeError, UnknownNameError
from guidekit.ops.spaces import flow_x
from guidekit.oracle import GaussianMixture
from guidekit.registry import SAMPLERS
from guidekit.samplers import FlowModel, VPModel, flow_sigmas, karras_sigmas, sample_euler, sample_heun
from guidekit.strategies import (
    APG,
    CFG,
    SAMG,
    AdaptiveGuidance,
    AutoGuidance,
    CFGPlusPlus,
    CFGZeroStar,
    GuidanceStrategy,
    Interval,
)

F64 = torch.float64
B = 8
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
UNCOND = torch.full((B,), -1)
SIGMAS = karras_sigmas(12, 0.05, 14.0)


def vp(prediction: str = "eps", gm: GaussianMixture | None = None) -> VPModel:
    return VPModel((gm or mixture()).as_model(prediction), prediction=prediction)


def run(strategy, sampler="euler", model=None, sigmas=SIGMAS, **kw):
    model = model or vp()
    return gk.sample(
        model, noise(B), sampler=sampler, schedule=sigmas, strategy=strategy, cond=LABELS, uncond=UNCOND, **kw
    )


def by_hand(combine, model=None, sigmas=SIGMAS, sampler=sample_euler):
    """A manual loop: both predictions from the adapter, combined by ``combine(c, u)`` in the native space."""
    model = model or vp()

    def den(x, sigma, info):
        c, u = model.predict(x, sigma, LABELS), model.predict(x, sigma, UNCOND)
        return model.to_x0(combine(c, u), x, sigma)

    return model.final_x(sampler(den, model.initial_x(noise(B), sigmas[0]), sigmas))


# -- CFG and the linearity lemma -------------------------------------------------------------------------
@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_cfg_through_the_loop_equals_cfg_by_hand(w):
    assert torch.allclose(run(CFG(w)), by_hand(lambda c, u: u + w * (c - u)), rtol=0, atol=1e-12)


@dataclass(frozen=True)
class CFGInX0(GuidanceStrategy):
    """CFG declared in x0 space (a tiny local strategy): the loop converts both predictions to x0."""

    scale: float = 3.0
    space: ClassVar[str] = "x0"

    def combine(self, pred_cond, pred_uncond, ctx):
        return pred_uncond + self.scale * (pred_cond - pred_uncond)


def test_cfg_gives_the_same_samples_in_every_space():
    """Linearity lemma (methods.md §2): eps-, v- and flow-models and an x0-space CFG agree."""
    ref = run(CFG(3.0))
    flow = FlowModel(mixture().as_model("flow"))
    s0 = SIGMAS[0]
    x_t = noise(B) * torch.sqrt(1 + s0**2) / (1 + s0)  # the same EDM start in flow coordinates
    from_flow = gk.sample(flow, x_t, schedule=SIGMAS, strategy=CFG(3.0), cond=LABELS, uncond=UNCOND)
    for other in (run(CFG(3.0), model=vp("v")), from_flow, run(CFGInX0())):
        assert torch.allclose(other, ref, rtol=0, atol=1e-9)


def test_samg_with_equal_bounds_gives_cfg_samples():
    assert torch.allclose(run(SAMG(w_min=3.0, w_max=3.0)), run(CFG(3.0)), rtol=0, atol=1e-12)


def test_guidance_raises_the_class_posterior():
    """p(class | x) rises with w on an overlapping 2-D mixture (CFG sharpens p(x|c) p(c|x)^(w-1))."""
    gm = GaussianMixture.random(3, 2, (2,), spread=1.5, std=0.6, seed=1)
    n = 400
    labels = torch.zeros(n, dtype=torch.long)
    x_t = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    posts = []
    for w in (0.0, 1.0, 2.0, 4.0):
        x = gk.sample(gm.as_model("eps"), x_t, steps=20, strategy=CFG(w), cond=labels, uncond=torch.full((n,), -1),
                      layout="b c")  # fmt: skip
        posts.append(float(gm.class_posterior(x, labels).mean()))
    assert posts == sorted(posts) and posts[-1] - posts[1] > 0.05, posts


# -- NFE and records -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("strategy", "per_step"), [(CFG(1.0), 1), (CFG(3.0), 2), (None, 1)])
def test_nfe_counts_the_branches(strategy, per_step):
    records = []
    run(strategy, callback=records.append)
    n = len(SIGMAS) - 1
    assert [r.nfe for r in records] == [per_step * (i + 1) for i in range(n)]
    assert all(r.uncond_used == (per_step == 2) and r.model_called for r in records)
    den = gk.guided(vp(), strategy, LABELS, UNCOND)
    sample_heun(den, vp().initial_x(noise(B), SIGMAS[0]), SIGMAS)
    assert den.nfe == per_step * (2 * n - 1) and den.forwards == 2 * n - 1


def test_step_records():
    records = []
    run(CFG(2.5), callback=records.append, record_scale_maps=True)
    assert [r.step for r in records] == list(range(len(SIGMAS) - 1))
    assert [r.sigma for r in records] == pytest.approx(SIGMAS[:-1].tolist())
    assert [r.sigma_next for r in records] == pytest.approx(SIGMAS[1:].tolist())
    r = records[3]
    assert (r.scale_mean, r.scale_min, r.scale_max) == (2.5, 2.5, 2.5) and r.scale_map.shape == (B, 1, 1, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.step = 0  # type: ignore[misc]
    plain = []
    run(CFG(2.5), callback=plain.append)
    assert plain[3].scale_map is None and plain[3].scale_mean == 2.5


def test_progress_bar(capsys):
    run(CFG(2.0), progress=True)
    assert "sampling" in capsys.readouterr().err
    run(CFG(2.0), progress=False)
    assert capsys.readouterr().err == ""


# -- Interval: saved evaluations -------------------------------------------------------------------------
def test_interval_saves_exactly_the_unconditional_evaluations_outside():
    lo, hi = 0.5, 3.0
    inside = [lo < s <= hi for s in SIGMAS[:-1].tolist()]
    records = []
    out = run(Interval(CFG(3.0), lo, hi), callback=records.append)
    n = len(SIGMAS) - 1
    assert records[-1].nfe == n + sum(inside) and 0 < sum(inside) < n
    assert [r.uncond_used for r in records] == inside
    assert not torch.allclose(out, run(CFG(1.0))) and not torch.allclose(out, run(CFG(3.0)))


def test_interval_equals_the_conditional_sampler_outside():
    """Before the interval the trajectory is the conditional one, bit for bit; all-covering = the inner CFG."""
    first_inside = next(i for i, s in enumerate(SIGMAS.tolist()) if s <= 3.0)
    trajectories = {}
    for name, strategy in (("interval", Interval(CFG(3.0), 0.5, 3.0)), ("cond", CFG(1.0))):
        seen = []
        model = vp()
        den = gk.guided(model, strategy, LABELS, UNCOND)
        sample_euler(den, model.initial_x(noise(B), SIGMAS[0]), SIGMAS, callback=seen.append)
        trajectories[name] = [s.x for s in seen]
    for i in range(first_inside):
        assert torch.equal(trajectories["interval"][i], trajectories["cond"][i])
    assert not torch.equal(trajectories["interval"][first_inside], trajectories["cond"][first_inside])
    assert torch.equal(run(Interval(CFG(3.0), 0.0, None)), run(CFG(3.0)))
    assert torch.equal(run(Interval(CFG(3.0), 100.0, 200.0)), run(CFG(1.0)))


# -- state: once per step --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spy(GuidanceStrategy):
    """Delegates to ``inner`` and logs ``(step, substep, state)`` of every evaluation (test only)."""

    inner: GuidanceStrategy = CFG(2.0)  # noqa: RUF009 - frozen
    log: list = dataclasses.field(default_factory=list, compare=False)

    @property
    def space(self):  # type: ignore[override]
        return self.inner.space

    def init_state(self, like):
        return self.inner.init_state(like)

    def combine(self, pred_cond, pred_uncond, ctx):
        return self.inner.combine(pred_cond, pred_uncond, ctx)

    def combine_step(self, pred_cond, pred_uncond, ctx, state):
        out, new = self.inner.combine_step(pred_cond, pred_uncond, ctx, state)
        self.log.append((ctx.step, ctx.substep, state, new, pred_cond, pred_uncond))
        return out, new


@dataclass(frozen=True)
class Counter(GuidanceStrategy):
    """A careless stateful strategy: it increments its counter on *every* evaluation, correctors included."""

    def init_state(self, like):
        return 0

    def combine(self, pred_cond, pred_uncond, ctx):
        return pred_cond

    def combine_step(self, pred_cond, pred_uncond, ctx, state):
        return pred_cond, state + 1


def test_the_loop_advances_state_once_per_step_under_heun():
    spy = Spy(Counter())
    den = gk.guided(vp(), spy, LABELS, UNCOND)
    sample_heun(den, vp().initial_x(noise(B), SIGMAS[0]), SIGMAS)
    n = len(SIGMAS) - 1
    assert [(step, sub, state) for step, sub, state, *_ in spy.log if sub == 0] == [(i, 0, i) for i in range(n)]
    # a corrector is handed the state its step's first evaluation returned, and what it returns is dropped
    assert [(step, state) for step, sub, state, *_ in spy.log if sub == 1] == [(i, i + 1) for i in range(n - 1)]


def test_apg_momentum_advances_once_per_step_under_heun():
    apg = APG(scale=4.0, eta=0.0, norm_threshold=0.0, momentum=-0.5)
    spy = Spy(apg)
    den = gk.guided(vp(), spy, LABELS, UNCOND)
    sample_heun(den, vp().initial_x(noise(B), SIGMAS[0]), SIGMAS)
    # replay the predictor evaluations alone: the momentum must match step by step
    state = apg.init_state(spy.log[0][4])
    predictors = [entry for entry in spy.log if entry[1] == 0]
    ctx = gk.GuidanceContext.default(spy.log[0][4])
    for step, _, seen_state, new_state, c, u in predictors:
        assert torch.equal(seen_state.running, state.running), step
        _, state = apg.step(c, u, ctx, state)
        assert torch.allclose(new_state.running, state.running, atol=1e-12)
    for step, _, seen_state, *_ in (entry for entry in spy.log if entry[1] == 1):
        after = next(e[3] for e in predictors if e[0] == step)  # the corrector is handed the predictor's state
        assert torch.equal(seen_state.running, after.running) and seen_state.step == step


def test_a_strategy_object_is_reusable_across_runs():
    apg = APG(scale=4.0, norm_threshold=0.0, momentum=-0.5)
    first, second = run(apg), run(apg)
    assert torch.equal(first, second)
    assert not torch.allclose(run(APG(scale=4.0, norm_threshold=0.0, momentum=0.0)), first)


# -- hooks -----------------------------------------------------------------------------------------------
def test_adaptive_guidance_switches_to_conditional_only():
    records = []
    out = run(AdaptiveGuidance(CFG(3.0), threshold=0.9), callback=records.append)
    used = [r.uncond_used for r in records]
    switch = used.index(False)
    assert switch > 0 and not any(used[switch:]) and records[-1].nfe == 2 * switch + (len(used) - switch)
    assert torch.allclose(run(AdaptiveGuidance(CFG(3.0), threshold=1.5)), run(CFG(3.0)), atol=1e-12)
    assert not torch.allclose(out, run(CFG(3.0)))


def test_zero_init_steps_skip_the_network_and_do_not_move():
    flow = FlowModel(mixture().as_model("flow"))
    sigmas = flow_sigmas(10, shift=2.0)
    records, seen = [], []
    den = gk.guided(flow, CFGZeroStar(scale=3.0, zero_init_steps=2), LABELS, UNCOND)
    x0 = flow.initial_x(noise(B), sigmas[0])
    gk.samplers.sample_flow_euler(den, x0, sigmas, callback=seen.append)
    records = den.records
    assert [r.model_called for r in records[:3]] == [False, False, True] and records[1].nfe == 0
    assert den.nfe == 2 * (10 - 2)
    for s in seen[:2]:  # velocity 0: the flow sample x_t does not move
        assert torch.allclose(flow_x(s.x, torch.tensor(s.sigma_next)), noise(B), atol=1e-12)


@pytest.mark.parametrize("sampler", ["euler", "ddim", "flow-euler"])
def test_cfgpp_renoises_with_the_unconditional_eps(sampler):
    """CFG++ (methods.md §7): x' = x0_λ + σ' ε_u in every first-order sampler, through the renoise hook."""
    lam = 0.6
    model = vp()

    def manual(x, sigma, info):
        c = model.to_x0(model.predict(x, sigma, LABELS), x, sigma)
        u = model.to_x0(model.predict(x, sigma, UNCOND), x, sigma)
        eps_u = (x - u) / sigma[:, None, None, None]
        return gk.samplers.Denoised(u + lam * (c - u), eps_u)

    x = model.initial_x(noise(B), SIGMAS[0])
    ref = sample_euler(manual, x, SIGMAS)
    by_hand_plain = by_hand(lambda c, u: u + lam * (c - u))
    out = run(CFGPlusPlus(lam), sampler=sampler)
    assert torch.allclose(out, ref, rtol=0, atol=1e-9)
    assert not torch.allclose(out, by_hand_plain, atol=1e-3)  # not plain CFG at λ


def test_weak_model_replaces_the_unconditional_branch():
    gm = mixture()
    weak_gm = GaussianMixture(gm.means.reshape(3, 2, 2, 4, 4), 0.9)  # a "bad version": blurrier components
    main, weak = vp(gm=gm), vp(gm=weak_gm)

    def den(x, sigma, info):
        d = main.to_x0(main.predict(x, sigma, LABELS), x, sigma)
        d_weak = weak.to_x0(weak.predict(x, sigma, LABELS), x, sigma)
        return d_weak + 2.0 * (d - d_weak)

    ref = main.final_x(sample_euler(den, main.initial_x(noise(B), SIGMAS[0]), SIGMAS))
    records = []
    out = gk.sample(main, noise(B), schedule=SIGMAS, strategy=AutoGuidance(2.0), cond=LABELS, weak_model=weak,
                    callback=records.append)  # fmt: skip
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    assert records[-1].nfe == 2 * (len(SIGMAS) - 1)
    with pytest.raises(ConfigError, match="weak_model"):
        gk.sample(main, noise(B), schedule=SIGMAS, strategy=AutoGuidance(2.0), cond=LABELS, uncond=UNCOND)


# -- conditions ------------------------------------------------------------------------------------------
def test_nested_conditions_are_batched_leaf_by_leaf():
    seen = []
    base = mixture().as_model("eps")

    def model(x, t, cond):
        seen.append((cond["labels"].shape, cond["extra"][0].shape, cond["tag"]))
        return base(x, t, cond["labels"])

    cond = {"labels": LABELS, "extra": (torch.zeros(1, 3),), "tag": "a"}
    uncond = {"labels": UNCOND, "extra": (torch.ones(1, 3),), "tag": "a"}
    out = gk.sample(model, noise(B), schedule=SIGMAS, strategy=CFG(3.0), cond=cond, uncond=uncond)
    assert seen[0] == ((2 * B,), (2 * B, 3), "a")
    assert torch.allclose(out, run(CFG(3.0)), atol=1e-12)
    with pytest.raises(ConfigError, match=r"uncond: expected the keys of cond \['extra', 'labels', 'tag'\]"):
        gk.sample(model, noise(B), schedule=SIGMAS, strategy=CFG(3.0), cond=cond, uncond={"labels": UNCOND})
    with pytest.raises(ShapeError, match=r"cond\['labels'\]: expected batch size 8 \(or 1\)"):
        gk.sample(model, noise(B), schedule=SIGMAS, strategy=CFG(3.0), cond={**cond, "labels": LABELS[:3]},
                  uncond=uncond)  # fmt: skip


def test_missing_uncond_is_named():
    with pytest.raises(ConfigError, match="uncond: expected the unconditional condition"):
        gk.sample(vp(), noise(B), schedule=SIGMAS, strategy=CFG(3.0), cond=LABELS)


# -- bad input -------------------------------------------------------------------------------------------
def test_bad_model_outputs_are_refused():
    base = mixture().as_model("eps")
    with pytest.raises(ShapeError, match="model output: expected a tensor shaped like the model input"):
        gk.sample(lambda x, t, c: base(x, t, c)[:, :1], noise(B), steps=3, strategy=CFG(2.0), cond=LABELS,
                  uncond=UNCOND)  # fmt: skip
    nan_model = lambda x, t, c: base(x, t, c) * float("nan")  # noqa: E731
    with pytest.raises(NonFiniteError, match="model output"):
        gk.sample(nan_model, noise(B), steps=3, cond=LABELS)
    out = gk.sample(nan_model, noise(B), steps=3, cond=LABELS, allow_nonfinite=True)
    assert torch.isnan(out).all()


def test_other_bad_arguments_are_named():
    with pytest.raises(LayoutError, match="x_T: layout 'b f c h w' has 5 axes"):
        gk.sample(mixture().as_model("eps"), noise(B), steps=3, cond=LABELS, layout="b f c h w")
    with pytest.raises(ConfigError, match="layout: expected the adapter's layout 'b c h w'"):
        gk.sample(vp(), noise(B), steps=3, cond=LABELS, layout="b f c h w")
    with pytest.raises(UnknownNameError, match=r"unknown sampler 'eulr'.*Known sampler names: ddim, dpmpp-2m, euler"):
        gk.sample(vp(), noise(B), sampler="eulr", steps=3, cond=LABELS)
    with pytest.raises(ConfigError, match=r"steps: expected len\(schedule\) - 1 = 12, got 5"):
        gk.sample(vp(), noise(B), schedule=SIGMAS, steps=5, cond=LABELS)
    with pytest.raises(ConfigError, match="schedule: expected a sigma tensor or one of 'flow'"):
        gk.sample(FlowModel(mixture().as_model("flow")), noise(B), schedule="karras", cond=LABELS)
    with pytest.raises(ConfigError, match="strategy"):
        gk.sample(vp(), noise(B), steps=3, cond=LABELS, strategy={"name": "cfg", "params": {"scale": "high"}})
    with pytest.raises(ConfigError, match="strategy: expected a GuidanceStrategy"):
        gk.guided(vp(), "cfg", LABELS)


def test_strategy_specs_and_named_schedules():
    spec = {"name": "cfg", "params": {"scale": 3.0}}
    assert torch.equal(run(spec), run(CFG(3.0)))
    for schedule in ("karras", "leading", "trailing", "linspace"):
        out = gk.sample(vp(), noise(B), steps=6, schedule=schedule, cond=LABELS)
        assert out.shape == noise(B).shape and torch.isfinite(out).all()


def test_a_plugin_sampler_is_used_by_name():
    calls = []

    def sample_twice_euler(denoiser, x, sigmas, *, generator=None, callback=None):
        calls.append(len(sigmas))
        return sample_euler(denoiser, x, sigmas, callback=callback)

    SAMPLERS.register("test-euler-plugin", sample_twice_euler)
    try:
        out = run(CFG(2.0), sampler="test-euler-plugin")
    finally:
        SAMPLERS.unregister("test-euler-plugin")
    assert calls == [len(SIGMAS)] and torch.equal(out, run(CFG(2.0)))


def test_state_any_type_passes_through():
    """A strategy state can be any Python object; the loop stores and hands it back untouched."""

    @dataclass(frozen=True)
    class Tagged(GuidanceStrategy):
        def init_state(self, like: torch.Tensor) -> Any:
            return ("tag", 0)

        def combine(self, pred_cond, pred_uncond, ctx):
            return pred_cond

        def combine_step(self, pred_cond, pred_uncond, ctx, state):
            assert state[0] == "tag"
            return pred_cond, ("tag", state[1] + 1)

    den = gk.guided(vp(), Tagged(), LABELS, UNCOND)
    sample_euler(den, vp().initial_x(noise(B), SIGMAS[0]), SIGMAS)
    assert den.engine._state == ("tag", len(SIGMAS) - 1)
