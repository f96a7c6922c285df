"""The embedded digits models: data, architecture, training recipe, shipped checkpoints, benches."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import guidekit as gk
from guidekit import zoo
from guidekit.zoo.classifier import random_shift
from guidekit.zoo.compare import DigitsBench, GMMBench, Settings
from guidekit.zoo.sweeps import default_sweeps, label
from guidekit.zoo.train import ClassifierRecipe, DenoiserRecipe, classifier_accuracy, train_classifier, train_denoiser
from guidekit.zoo.unet import timestep_embedding


@pytest.fixture(scope="module")
def digits() -> zoo.DigitsSplit:
    return zoo.load_digits()


@pytest.fixture(scope="module")
def bench() -> DigitsBench:
    return DigitsBench()


# -- data ------------------------------------------------------------------------------------------
def test_digits_split_is_stratified_scaled_and_fixed(digits: zoo.DigitsSplit) -> None:
    assert digits.train_images.shape == (1437, 1, 8, 8) and digits.test_images.shape == (360, 1, 8, 8)
    assert float(digits.train_images.min()) == -1.0 and float(digits.train_images.max()) == 1.0
    train_share = torch.bincount(digits.train_labels, minlength=10) / 1437
    test_share = torch.bincount(digits.test_labels, minlength=10) / 360
    assert float((train_share - test_share).abs().max()) < 0.01  # stratified
    again = zoo.load_digits()
    assert torch.equal(again.test_images, digits.test_images) and torch.equal(again.train_labels, digits.train_labels)
    # no image is in both splits
    train = {tuple(x.flatten().tolist()) for x in digits.train_images}
    assert sum(tuple(x.flatten().tolist()) in train for x in digits.test_images) < 5  # sklearn has a few duplicates
    with pytest.raises(ValueError, match="split: expected 'train' or 'test', got 'val'"):
        digits.split("val")


@settings(max_examples=20)
@given(st.integers(1, 6), st.integers(0, 2), st.integers(0, 2**31 - 1))
def test_random_shift_moves_each_image_by_at_most_max_shift(n: int, max_shift: int, seed: int) -> None:
    x = torch.rand(n, 1, 6, 6) * 2 - 1
    out = random_shift(x, torch.Generator().manual_seed(seed), max_shift)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, value=-1.0)
    windows = [
        padded[:, :, dy : dy + 6, dx : dx + 6] for dy in range(2 * max_shift + 1) for dx in range(2 * max_shift + 1)
    ]
    assert all(any(torch.equal(out[i], w[i]) for w in windows) for i in range(n))


# -- architecture ----------------------------------------------------------------------------------
def test_unet_shapes_null_class_and_schedule() -> None:
    model = zoo.DigitsUNet()
    assert 3.5e5 < sum(p.numel() for p in model.parameters()) < 5e5  # the compact ~0.4M net
    x = torch.randn(3, 1, 8, 8)
    labels = torch.tensor([0, 9, zoo.NULL_CLASS])
    assert model(x, torch.tensor([0.0, 500.5, 999.0]), labels).shape == x.shape
    assert model(x, 10.0, labels).shape == x.shape  # a scalar timestep broadcasts
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod.double()
    assert torch.allclose(model.alphas_cumprod, reference, atol=1e-6)  # diffusers computes in float32


@given(st.floats(0, 999), st.integers(1, 8).map(lambda k: 2 * k))
def test_timestep_embedding_is_bounded_and_distinguishes_times(t: float, half: int) -> None:
    emb = timestep_embedding(torch.tensor([t, t + 1.0]), 2 * half)
    assert emb.shape == (2, 2 * half) and float(emb.abs().max()) <= 1.0
    assert torch.allclose(emb[:, :half] ** 2 + emb[:, half:] ** 2, torch.ones(2, half))
    assert not torch.allclose(emb[0], emb[1])


# -- training recipe -------------------------------------------------------------------------------
def test_training_is_reproducible_with_a_seed(digits: zoo.DigitsSplit) -> None:
    recipe = DenoiserRecipe(channels=(8, 16), emb_dim=16, steps=3, batch_size=8)
    a, b = train_denoiser(digits, recipe), train_denoiser(digits, recipe)
    c = train_denoiser(digits, DenoiserRecipe(channels=(8, 16), emb_dim=16, steps=3, batch_size=8, seed=1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not any(p.requires_grad for p in a.parameters())
    clf = ClassifierRecipe(epochs=1, batch_size=256)
    ca, cb = train_classifier(digits, clf), train_classifier(digits, clf)
    assert all(torch.equal(x, y) for x, y in zip(ca.state_dict().values(), cb.state_dict().values(), strict=True))


# -- shipped checkpoints ---------------------------------------------------------------------------
def test_records_say_how_each_checkpoint_was_made() -> None:
    for name in ("digits_denoiser", "digits_denoiser_weak", "digits_classifier"):
        record = zoo.checkpoint_record(name)
        assert record["training_command"].startswith("python -m guidekit.zoo.train")
        assert record["data"]["split"] == zoo.DIGITS_SPLIT and record["data"]["train"] == 1437
        assert isinstance(record["recipe"]["seed"], int)
    denoiser = zoo.checkpoint_record("digits_denoiser")
    assert denoiser["recipe"]["steps"] >= 2000 and denoiser["schedule"]["prediction"] == "eps"
    assert {"cfg_1", "cfg_3", "settings"} <= set(denoiser["held_out"])
    with pytest.raises(FileNotFoundError, match=r"checkpoint 'nope': expected .*nope\.json"):
        zoo.checkpoint_record("nope")


def test_classifier_reproduces_its_recorded_held_out_accuracy(digits: zoo.DigitsSplit) -> None:
    recorded = zoo.checkpoint_record("digits_classifier")["held_out"]["accuracy"]
    clf = zoo.load_classifier()
    acc = classifier_accuracy(clf, digits.test_images, digits.test_labels)
    assert acc == pytest.approx(recorded, abs=1e-4) and acc >= 0.98
    half = classifier_accuracy(clf, digits.test_images[::2], digits.test_labels[::2])
    assert half >= 0.97  # a subset agrees


def test_denoiser_gives_class_accurate_samples_at_w3(bench: DigitsBench) -> None:
    run = bench.run(gk.CFG(3.0), Settings(steps=10, per_class=3))
    assert run.metrics["acc"] >= 0.9 and run.metrics["nfe"] == 20.0
    unguided = bench.run(gk.CFG(0.0), Settings(steps=10, per_class=3))  # unconditional: about chance
    assert unguided.metrics["acc"] < 0.5
    assert zoo.load_denoiser().prediction == "eps"


def test_weak_model_is_weaker_and_drives_autoguidance(bench: DigitsBench) -> None:
    main = zoo.checkpoint_record("digits_denoiser")
    weak = zoo.checkpoint_record("digits_denoiser_weak")
    assert weak["parameters"] < main["parameters"] / 2
    assert weak["held_out"]["cfg_1"]["fd_test"] > main["held_out"]["cfg_1"]["fd_test"]
    run = bench.run(gk.strategies.get("autoguidance")(2.0), Settings(steps=4, per_class=1))
    assert run.metrics["nfe"] == 8.0  # main + weak model every step


# -- benches ---------------------------------------------------------------------------------------
def test_runs_share_noise_per_seed(bench: DigitsBench) -> None:
    s = Settings(steps=3, per_class=1)
    a, b, c = bench.run(gk.CFG(1.0), s, 0), bench.run(gk.CFG(1.0), s, 0), bench.run(gk.CFG(1.0), s, 1)
    assert torch.equal(a.samples, b.samples) and not torch.equal(a.samples, c.samples)
    assert a.metrics["nfe"] == 3.0  # scale 1: conditional only


def test_gmm_bench_is_exact_and_guidance_raises_fidelity() -> None:
    gmm = GMMBench()
    s = Settings(steps=8, per_class=4)
    weak, strong = gmm.run(gk.CFG(1.0), s).metrics, gmm.run(gk.CFG(4.0), s).metrics
    assert set(gmm.columns) <= set(weak)
    assert strong["p_y"] > weak["p_y"] and strong["ed"] > 0
    assert gmm.reference_images(2).shape == (20, 1, 8, 8)
    with pytest.raises(gk.ConfigError, match="needs a weak model"):
        gmm.run(gk.strategies.get("autoguidance")(2.0), s)


def test_settings_validate_their_fields() -> None:
    with pytest.raises(gk.UnknownNameError, match="did you mean 'ddim'"):
        Settings(sampler="ddin")
    with pytest.raises(gk.ConfigError, match="steps: expected an integer >= 1, got 0"):
        Settings(steps=0)


def test_default_sweeps_cover_every_registered_strategy() -> None:
    sweeps, skipped = default_sweeps()
    names = {s.name for s in sweeps} | set(skipped)
    assert names == set(gk.strategies.names())
    assert {"cfg", "apg", "interval", "samg"} <= {s.name for s in sweeps}
    for sweep in sweeps:
        for _, strategy in sweep.strategies():
            assert gk.build(gk.to_spec(strategy)) == strategy
            assert label(strategy).split()[0] == gk.to_spec(strategy).name


@given(st.floats(0.5, 10), st.floats(0.5, 10))
def test_labels_keep_what_rebuilds_the_strategy(a: float, b: float) -> None:
    lo, hi = min(a, b), max(a, b)
    text = label(gk.SAMG(w_min=lo, w_max=hi))
    assert text == f"samg w_min={lo:g} w_max={hi:g}"
    # defaults are left out: they are what rebuilds the strategy
    assert label(gk.CFG(a)) == ("cfg" if a == gk.CFG().scale else f"cfg scale={a:g}")
