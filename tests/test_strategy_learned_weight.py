"""Learned guidance weights (``learned-weight``): the rule, the condition and next sigma it reads, the
combinators, every sampler, the shipped weights, and training (MMD objective, resume, reward, command)."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from torch import Tensor

import guidekit as gk
from guidekit.context import GuidanceContext
from guidekit.errors import ConfigError, ShapeError
from guidekit.oracle import UNCOND, GaussianMixture
from guidekit.samplers import names as sampler_names
from guidekit.strategies.learned_weight import (
    GuidanceWeightNet,
    LearnedWeight,
    constant_weight,
    load_guidance_weights,
    save_guidance_weights,
)
from guidekit.zoo.train_guidance import (
    GMMTestbed,
    GuidanceRecipe,
    best_constant,
    energy_mmd,
    gmm_distance,
    train_guidance,
)

CHECKPOINTS = Path(gk.__file__).parent / "zoo" / "checkpoints"
DIGITS = ("digits_learned_weight", "digits_learned_weight_reward", "digits_weak_learned_weight")
OMEGA = 2.0  # CFG scale 3: both exact in binary, so "constant ω = CFG" can be bit for bit


@pytest.fixture(scope="module")
def constant(tmp_path_factory: pytest.TempPathFactory) -> LearnedWeight:
    return LearnedWeight(str(constant_weight(OMEGA, tmp_path_factory.mktemp("w") / "constant")))


def _pair(shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


# -- the rule -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 4, 5, 5), (2, 3, 4, 5, 5)])
def test_constant_omega_is_cfg_bit_for_bit(constant: LearnedWeight, dtype: torch.dtype, shape: tuple) -> None:
    c, u = _pair(shape, dtype)
    assert torch.equal(constant(c, u), gk.CFG(1 + OMEGA)(c, u))


def test_rule_is_the_papers_x0_form() -> None:
    """``x̂_c + ω (x̂_c - x̂_∅)`` with ω from the net, per sample (its condition, t and s)."""
    s = LearnedWeight("gmm_imperfect_learned_weight")
    c, u = _pair((3, 2, 1, 1))
    ctx = GuidanceContext(
        sigma=torch.tensor([5.0, 1.0, 0.2]), sigma_next=torch.tensor([2.0, 0.4, 0.0]), condition=torch.tensor([0, 1, 2])
    )
    omega = s.net(ctx.condition, ctx.sigma_next, ctx.sigma).double()
    expected = c + omega.view(-1, 1, 1, 1) * (c - u)
    torch.testing.assert_close(s.step(c, u, ctx, None)[0], expected, rtol=1e-12, atol=1e-12)
    assert len(set(omega.tolist())) == 3  # the weight does vary with (c, s, t)
    assert s.scale_map(c, u, ctx).flatten().tolist() == pytest.approx((1 + omega).tolist())


def test_omega_scale_multiplies_omega(tmp_path: Path) -> None:
    path = str(constant_weight(0.5, tmp_path / "w"))
    c, u = _pair((2, 3, 4, 4))
    assert torch.equal(LearnedWeight(path, omega_scale=4.0)(c, u), gk.CFG(3.0)(c, u))


def test_condition_changes_omega_and_unknown_row_without_condition() -> None:
    net = load_guidance_weights("gmm_imperfect_learned_weight")
    sig, nxt = torch.full((3,), 3.0), torch.full((3,), 1.0)
    per_class = net(torch.tensor([0, 1, 2]), nxt, sig)
    assert per_class.unique().numel() == 3
    unknown = net(None, nxt, sig)
    torch.testing.assert_close(net(torch.tensor([-1, 3, -1]), nxt, sig), unknown)  # -1 and K: "none"
    # without a condition in the context (a diffusers path, a direct call) the unknown row is used
    s = LearnedWeight("gmm_imperfect_learned_weight")
    ctx = GuidanceContext(sigma=sig, sigma_next=nxt)
    torch.testing.assert_close(s.omega(ctx), unknown.double())


def test_shared_sigma_fast_path_equals_the_per_row_net() -> None:
    """A batch sharing its sigmas runs the net once per class row (remembered per (t, s)) and gathers."""
    net = load_guidance_weights("digits_learned_weight")
    labels = torch.tensor([3, 10, 0, 9, 3, 3, 7, 1, 2, 5, 4, 6, 8, 10])
    for _ in range(2):  # computed, then remembered
        for t, s in ((80.0, 40.0), (0.5, 0.0)):
            sig_t, sig_s = torch.full((14,), t, dtype=torch.float64), torch.full((14,), s, dtype=torch.float64)
            torch.testing.assert_close(
                net.per_sample(labels, sig_s, sig_t), net(labels, sig_s, sig_t), rtol=0, atol=1e-12
            )
    mixed = torch.linspace(0.1, 5, 14, dtype=torch.float64)
    torch.testing.assert_close(net.per_sample(labels, mixed / 2, mixed), net(labels, mixed / 2, mixed))


def test_missing_next_sigma_means_zero() -> None:
    s = LearnedWeight("gmm_learned_weight")
    labels = torch.tensor([0, 1])
    without = s.omega(GuidanceContext(sigma=torch.full((2,), 2.0), condition=labels))
    with_zero = s.omega(GuidanceContext(sigma=torch.full((2,), 2.0), sigma_next=torch.zeros(2), condition=labels))
    assert torch.equal(without, with_zero)


@pytest.mark.parametrize(
    ("condition", "error", "match"),
    [
        (torch.tensor([0.0, 1.0]), ShapeError, r"ctx.condition: expected integer class labels of shape \(2,\)"),
        (torch.tensor([[0], [1]]), ShapeError, "ctx.condition: expected integer class labels"),
        (torch.tensor([0, 7]), ConfigError, r"ctx.condition: expected class labels in 0..2 \(or 3 / -1 for none\)"),
    ],
)
def test_bad_condition_is_named(condition: Tensor, error: type, match: str) -> None:
    s = LearnedWeight("gmm_learned_weight")
    c, u = _pair((2, 2, 1, 1))
    with pytest.raises(error, match=match):
        s.step(c, u, GuidanceContext(sigma=torch.ones(2), condition=condition), None)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": ""}, "weights: expected a shipped name or a file path, got ''"),
        ({"weights": "no_such_weights"}, "weights: expected a shipped name .* does not exist"),
        ({"weights": "gmm_learned_weight", "omega_scale": float("nan")}, "omega_scale: expected a finite number"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LearnedWeight(**kwargs)


def test_foreign_json_is_refused(tmp_path: Path) -> None:
    path = constant_weight(1.0, tmp_path / "w")
    path.with_suffix(".json").write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(ConfigError, match=r"weights: expected a JSON record of kind .guidekit\.learned-weight."):
        LearnedWeight(str(path))


def test_save_keeps_dots_in_the_name(tmp_path: Path) -> None:
    a = save_guidance_weights(GuidanceWeightNet(0, omega_init=0.5), tmp_path / "leak-0.5")
    b = save_guidance_weights(GuidanceWeightNet(0, omega_init=0.0), tmp_path / "leak-0.0")
    assert (a.name, b.name) == ("leak-0.5.safetensors", "leak-0.0.safetensors")
    assert a.with_suffix(".json").exists()
    ctx = GuidanceContext(sigma=torch.ones(1))
    assert float(LearnedWeight(str(a)).omega(ctx)[0]) == 0.5


def test_spec_round_trip() -> None:
    s = LearnedWeight("gmm_learned_weight", omega_scale=1.5)
    assert gk.build(json.loads(gk.to_spec(s).model_dump_json())) == s


# -- in the loop: condition and s reach the net, every sampler, combinators ---------------------------
@dataclass(frozen=True)
class _Recording(LearnedWeight):
    seen: list = None  # type: ignore[assignment]

    def omega(self, ctx: GuidanceContext) -> Tensor:
        self.seen.append(ctx)
        return super().omega(ctx)


def _oracle(event: tuple[int, ...] = (2, 1, 1)) -> GaussianMixture:
    return GaussianMixture.random(3, 2, event, spread=2.0, seed=0)


def _sample(strategy: gk.GuidanceStrategy, sampler: str, dtype: torch.dtype, event: tuple = (2, 1, 1)) -> Tensor:
    mix = _oracle(event)
    flow = sampler == "flow-euler"
    labels = torch.tensor([0, 1, 2, 1])
    noise = torch.randn(4, *event, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return gk.sample(
        mix.as_model("flow" if flow else "eps"),
        noise,
        sampler=sampler,
        steps=6,
        strategy=strategy,
        cond=labels,
        uncond=torch.full_like(labels, UNCOND),
        prediction="flow" if flow else "eps",
        layout="b c f h w" if len(event) == 4 else None,
        generator=[torch.Generator().manual_seed(i) for i in range(4)],
        progress=False,
    )


@pytest.mark.parametrize("sampler", sampler_names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_sampler_constant_omega_is_cfg(constant: LearnedWeight, sampler: str, dtype: torch.dtype) -> None:
    out = _sample(constant, sampler, dtype)
    assert out.dtype == dtype
    assert torch.equal(out, _sample(gk.CFG(1 + OMEGA), sampler, dtype))


@pytest.mark.parametrize("sampler", sampler_names())
def test_every_sampler_hands_the_condition_and_next_sigma(sampler: str) -> None:
    seen: list[GuidanceContext] = []
    out = _sample(_Recording("gmm_learned_weight", seen=seen), sampler, torch.float32)
    assert torch.isfinite(out).all()
    assert seen and all(torch.equal(ctx.condition, torch.tensor([0, 1, 2, 1])) for ctx in seen)
    for ctx in seen:
        assert ctx.sigma_next is not None
        if ctx.substep == 0:
            assert float(ctx.sigma_next[0]) == pytest.approx(float(ctx.sigmas[ctx.step + 1]), rel=1e-6)


def test_5d_video_layout(constant: LearnedWeight) -> None:
    event = (2, 3, 1, 1)  # (c, f, h, w)
    assert torch.equal(
        _sample(constant, "euler", torch.float32, event), _sample(gk.CFG(3.0), "euler", torch.float32, event)
    )
    learned = _sample(LearnedWeight("gmm_learned_weight"), "euler", torch.float32, event)
    assert torch.isfinite(learned).all()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: gk.Interval(s, sigma_lo=0.3, sigma_hi=3.0),
        lambda s: gk.Rescale(s, 0.7),
        lambda s: gk.Interval(gk.Rescale(s, 0.5), sigma_lo=0.1, sigma_hi=None),
    ],
)
def test_composes_with_combinators(constant: LearnedWeight, wrap) -> None:
    for sampler in ("euler", "heun"):
        assert torch.equal(
            _sample(wrap(constant), sampler, torch.float32), _sample(wrap(gk.CFG(1 + OMEGA)), sampler, torch.float32)
        )
    seen: list[GuidanceContext] = []
    assert torch.isfinite(_sample(wrap(_Recording("gmm_learned_weight", seen=seen)), "euler", torch.float32)).all()
    assert seen and seen[0].condition is not None  # the condition passes through the combinator


def test_gradients_flow_to_predictions_not_to_omega() -> None:
    s = LearnedWeight("gmm_learned_weight")
    c, u = (t.requires_grad_(True) for t in _pair((2, 2, 1, 1)))
    ctx = GuidanceContext(sigma=torch.tensor([1.0, 2.0]), condition=torch.tensor([0, 2]))
    assert torch.autograd.gradcheck(lambda c, u: s.step(c, u, ctx, None)[0], (c, u))
    assert not any(p.requires_grad for p in s.net.parameters())


# -- the shipped weights ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", [*DIGITS, "gmm_learned_weight", "gmm_imperfect_learned_weight", "glyphs_learned_weight"]
)
def test_shipped_weights_load_with_their_command(name: str) -> None:
    assert LearnedWeight(name).net.num_classes in (3, 10, 65)  # oracle classes, digits, glyphs prompts
    record = json.loads((CHECKPOINTS / f"{name}.json").read_text())
    assert record["kind"] == "guidekit.learned-weight"
    assert record["command"].startswith("guidekit train-guidance")
    assert isinstance(record["seed"], int)


def test_default_is_the_shipped_digits_weight() -> None:
    assert LearnedWeight().net.num_classes == 10
    assert "learned-weight" in gk.strategies.names()


# -- the objective and training -----------------------------------------------------------------------
def test_energy_mmd_is_zero_in_expectation_and_positive_for_different_sets() -> None:
    g = torch.Generator().manual_seed(0)
    same = energy_mmd(torch.randn(200, 64, 3, generator=g), torch.randn(200, 64, 3, generator=g))
    shifted = energy_mmd(torch.randn(4, 64, 3, generator=g), torch.randn(4, 64, 3, generator=g) + 1.0)
    assert abs(float(same.mean())) < 0.01
    assert bool((shifted > 0.3).all())


def _net_values(net: GuidanceWeightNet) -> Tensor:
    sig = torch.logspace(-2, 2, 9)
    return torch.stack([net(torch.full((9,), c), sig / 2, sig) for c in range(net.num_classes)]).double()


@pytest.mark.slow
def test_training_reproduces_the_shipped_gmm_weights() -> None:
    """The shipped ``gmm_learned_weight`` is what its recorded recipe trains, from scratch (about 5 s)."""
    name = "gmm_learned_weight"
    record = json.loads((CHECKPOINTS / f"{name}.json").read_text())
    recipe = GuidanceRecipe(**{**record["recipe"], "schedule_steps": tuple(record["recipe"]["schedule_steps"])})
    trained = train_guidance(GMMTestbed.small(seed=record["seed"]), recipe).net
    torch.testing.assert_close(_net_values(trained), _net_values(load_guidance_weights(name)), rtol=1e-4, atol=1e-4)


def test_resume_gives_the_uninterrupted_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import guidekit.zoo.train_guidance as tg

    testbed = GMMTestbed.small()
    recipe = GuidanceRecipe(steps=12, groups=4, per_group=8, checkpoint_every=4)
    straight = train_guidance(testbed, recipe).net
    state = tmp_path / "state.pt"
    real, calls = tg._loss, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tg, "_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_guidance(testbed, recipe, resume=state)
    assert state.exists()  # saved after step 8
    monkeypatch.setattr(tg, "_loss", real)
    resumed = train_guidance(testbed, recipe, resume=state)
    assert not state.exists()  # removed once training ends
    for a, b in zip(straight.state_dict().values(), resumed.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # a state of another recipe is refused, not silently continued
    monkeypatch.setattr(tg, "_loss", interrupted)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        train_guidance(testbed, recipe, resume=state)
    monkeypatch.setattr(tg, "_loss", real)
    with pytest.raises(ConfigError, match="--resume: expected a state of the same testbed and recipe"):
        train_guidance(testbed, replace(recipe, lr=0.5), resume=state)


class _RewardedGMM(GMMTestbed):
    """The imperfect oracle with a reward: the exact class posterior ``log p(c | x0)``."""

    def log_reward(self, x0: Tensor, labels: Tensor) -> Tensor:
        return self.mixture.class_posterior(x0.double(), labels).clamp_min(1e-12).log().float()


def test_reward_tilt_raises_the_weight() -> None:
    testbed = _RewardedGMM(_oracle(), leak=0.5)
    recipe = GuidanceRecipe(steps=60, groups=8, per_group=16, schedule_steps=(10,))
    plain = train_guidance(testbed, recipe)
    tilted = train_guidance(testbed, replace(recipe, reward=1.0))
    assert "log_p" in tilted.history[-1]
    assert float(_net_values(tilted.net).mean()) > float(_net_values(plain.net).mean()) + 0.2


def test_reward_needs_a_classifier() -> None:
    with pytest.raises(ConfigError, match="reward: expected 0 for testbed 'gmm'"):
        train_guidance(GMMTestbed.small(), GuidanceRecipe(steps=1, groups=2, per_group=4, reward=1.0))


@pytest.mark.parametrize(("field", "value"), [("steps", 0), ("per_group", 1), ("p_unknown", 1.5)])
def test_bad_recipe_is_named(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"{field}: expected"):
        GuidanceRecipe(**{field: value})


# -- the testbed result: learned ω beats the best constant scale ---------------------------------------
@pytest.mark.parametrize("name", ["gmm_learned_weight", "gmm_imperfect_learned_weight"])
def test_learned_beats_the_best_constant_scale(name: str) -> None:
    """On the oracle (exact, and a conditional model pulled halfway to the unconditional one), the shipped
    learned ω is closer to the true conditional than the best constant CFG scale found by search on the
    same seed, for every seed, by more than the spread of the paired differences over seeds."""
    testbed = GMMTestbed.small(leak=0.5 if "imperfect" in name else 0.0)
    scales = [0.75 + 0.25 * i for i in range(10)]  # 0.75 .. 3; the best is 1-1.25 (exact), 2.25 (imperfect)
    learned = LearnedWeight(name)
    gaps = []
    for seed in range(3):
        _, best = best_constant(testbed, scales, steps=10, per_class=300, seed=seed)
        gaps.append(best - gmm_distance(testbed, learned, steps=10, per_class=300, seed=seed))
    assert min(gaps) > 0, gaps
    assert statistics.mean(gaps) > max(gaps) - min(gaps), gaps


# -- the command --------------------------------------------------------------------------------------
def test_command_writes_weights_record_and_picture_all_or_none(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from guidekit.cli import main

    out = tmp_path / "run"
    args = ["train-guidance", "--testbed", "gmm", "--steps", "3", "--groups", "2", "--per-group", "4", "--quiet"]
    args += ["--eval-per-class", "50"]
    assert main([*args, "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        ".guidekit-run.json",
        "gmm_learned_weight-omega.png",
        "gmm_learned_weight.json",
        "gmm_learned_weight.safetensors",
    ]
    record = json.loads((out / "gmm_learned_weight.json").read_text())
    assert record["command"].startswith("guidekit train-guidance --testbed gmm --steps 3")
    assert len(record["evaluation"]["per_seed"]) == 3
    assert LearnedWeight(str(out / "gmm_learned_weight.safetensors")).net.num_classes == 3
    assert main([*args, "--out", str(out)]) == 2  # an earlier run needs --force
    assert "pass --force" in capsys.readouterr().err
    assert main([*args, "--reward", "1", "--out", str(tmp_path / "other")]) == 2
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").iterdir())


def test_declares_that_it_reads_the_condition(tmp_path: Path) -> None:
    assert LearnedWeight().reads_condition()
    assert gk.Interval(gk.Rescale(LearnedWeight())).reads_condition()  # combinators delegate
    assert not LearnedWeight(str(constant_weight(1.0, tmp_path / "c"))).reads_condition()  # no class rows
    assert not gk.CFG(2.0).reads_condition()


# -- prompts: the glyphs model ------------------------------------------------------------------------
def _prompt_net() -> GuidanceWeightNet:
    torch.manual_seed(0)
    net = GuidanceWeightNet(65, slots=(11, 6)).double()
    torch.nn.init.normal_(net.out.weight)  # a net whose ω varies with the prompt
    return net


def test_prompt_net_has_one_row_per_prompt_and_the_all_null_prompt_is_unknown() -> None:
    net = _prompt_net()
    prompts = torch.tensor([[3, 4], [3, 5], [10, 4], [0, 0], [10, 5]])  # full, digit-only, texture-only, ..., null
    assert net.index(prompts, 5, torch.device("cpu")).tolist() == [3 * 6 + 4, 3 * 6 + 5, 10 * 6 + 4, 0, 65]
    assert net.index(None, 2, torch.device("cpu")).tolist() == [65, 65]
    sig = torch.full((5,), 2.0, dtype=torch.float64)
    omega = net(prompts, sig / 2, sig)
    assert omega[:4].unique().numel() == 4
    torch.testing.assert_close(omega[4:], net(None, sig[:1] / 2, sig[:1]))
    torch.testing.assert_close(net.per_sample(prompts, sig / 2, sig), omega, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("condition", "error", "match"),
    [
        (torch.tensor([3, 4]), ShapeError, r"expected integer prompt tokens of shape \(2, 2\)"),
        (torch.tensor([[3.0, 4.0], [1.0, 1.0]]), ShapeError, "expected integer prompt tokens"),
        (torch.tensor([[3, 6], [1, 1]]), ConfigError, r"tokens in 0..5 in prompt slot 1 \(5 = null\), got 6"),
        (torch.tensor([[-1, 0], [1, 1]]), ConfigError, r"tokens in 0..10 in prompt slot 0"),
    ],
)
def test_bad_prompt_is_named(condition: Tensor, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _prompt_net().index(condition, 2, torch.device("cpu"))


def test_prompt_net_round_trips_and_is_checked(tmp_path: Path) -> None:
    net = _prompt_net()
    loaded = load_guidance_weights(save_guidance_weights(net, tmp_path / "p"))
    assert loaded.slots == (11, 6) and loaded.num_classes == 65
    prompts, sig = torch.tensor([[1, 2], [10, 3]]), torch.full((2,), 1.5, dtype=torch.float64)
    torch.testing.assert_close(loaded(prompts, sig / 3, sig), net(prompts, sig / 3, sig))
    assert "slots" not in GuidanceWeightNet(10).config  # a label net's record is unchanged (old files load)
    with pytest.raises(ConfigError, match=r"num_classes: expected prod\(slots\) - 1 = 65"):
        GuidanceWeightNet(10, slots=(11, 6))
    with pytest.raises(ConfigError, match="slots: expected token counts >= 2"):
        GuidanceWeightNet(0, slots=(1,))


def test_shipped_glyphs_weight_samples_the_glyphs_model_with_prompts() -> None:
    """``glyphs_learned_weight`` through ``gk.sample``: ω per sample is its prompt's row (null slots too)."""
    from guidekit.zoo import glyphs

    model = glyphs.load_denoiser()
    record = json.loads((CHECKPOINTS / "glyphs_learned_weight.json").read_text())
    assert record["command"].startswith("guidekit train-guidance --testbed glyphs")
    seen: list[GuidanceContext] = []
    strategy = _Recording("glyphs_learned_weight", seen=seen)
    assert strategy.net.slots == (glyphs.NULL_DIGIT + 1, glyphs.NULL_TEXTURE + 1)
    cond = glyphs.prompt_tokens(torch.tensor([3, 7, 3, glyphs.NULL_DIGIT]), torch.tensor([4, 0, 5, 2]))
    noise = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = {"prediction": "eps", "alphas_cumprod": model.alphas_cumprod, "schedule": "trailing", "progress": False}
    with torch.no_grad():
        out = gk.sample(
            model, noise, steps=3, strategy=strategy, cond=cond, uncond=glyphs.prompt_tokens(None, None, 4), **kwargs
        )
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert len(seen) == 3 and all(torch.equal(ctx.condition, cond) for ctx in seen)
    plain = LearnedWeight("glyphs_learned_weight")
    for ctx in seen:
        expected = plain.net(cond, ctx.sigma_next.double(), ctx.sigma.double())
        torch.testing.assert_close(plain.omega(ctx), expected.double())


def test_glyphs_testbed_trains_on_prompts_with_null_slots() -> None:
    from guidekit.zoo.glyphs import NULL_DIGIT, NULL_TEXTURE
    from guidekit.zoo.train_guidance import GlyphsTestbed

    testbed = GlyphsTestbed(pool=300)
    drawn = testbed.draw_conditions(400, torch.Generator().manual_seed(0))
    null = torch.tensor([NULL_DIGIT, NULL_TEXTURE])
    assert not bool((drawn == null).all(1).any())  # the all-null prompt is not trained on (a no-op)
    assert bool((drawn[:, 0] == NULL_DIGIT).any()) and bool((drawn[:, 1] == NULL_TEXTURE).any())
    samples = testbed.true_samples(torch.tensor([[3, NULL_TEXTURE]]), 5, torch.Generator().manual_seed(0))
    assert samples.shape == (1, 5, 1, 16, 16)
    result = train_guidance(testbed, GuidanceRecipe(steps=2, groups=2, per_group=4, schedule_steps=(5,)))
    assert result.net.slots == testbed.slots and len(result.history) == 2
    assert all(torch.isfinite(torch.tensor(h["mmd"])) for h in result.history)


def test_glyphs_demo_runs_the_glyphs_weight() -> None:
    """``guidekit demo --model glyphs`` lists learned-weight with the glyphs model's own ω (prompts, not labels)."""
    from guidekit.zoo.glyphs.demo import glyphs_entries

    entries, skipped = glyphs_entries(["learned-weight"])
    assert [e.strategy.weights for e in entries] == ["glyphs_learned_weight"] and not skipped
