"""The embedded glyphs model: procedural data, prompts, the attention U-net's layer names, the shipped
checkpoints, prompt consistency under CFG, negative prompts, attention perturbations and the demo.

Nothing trains here: the checkpoints are the shipped ones, and every sample is a few steps."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import guidekit as gk
from guidekit.errors import ConfigError, ShapeError
from guidekit.zoo import glyphs
from guidekit.zoo.compare import Settings
from guidekit.zoo.glyphs.bench import GlyphsBench, label_prompts
from guidekit.zoo.glyphs.data import PERIOD, source_digits, texture_patterns
from guidekit.zoo.glyphs.figures import classifier_figures, held_out_loss
from guidekit.zoo.glyphs.metrics import glyph_metrics, glyphs_reference, high_pass_spectrum

SEEDS = st.integers(min_value=0, max_value=2**31 - 1)
FEW = Settings(sampler="ddim", steps=10, per_class=1, schedule="trailing")
"""A few-step setting: 10 trailing DDIM steps, one sample per prompt."""


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small convolutions on a shared 2-core machine run fastest on one thread (see tests/test_video_zoo.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def denoiser() -> glyphs.GlyphsUNet:
    return glyphs.load_denoiser()


@pytest.fixture(scope="module")
def classifier() -> glyphs.GlyphsClassifier:
    return glyphs.load_classifier()


@pytest.fixture(scope="module")
def bench(denoiser: glyphs.GlyphsUNet, classifier: glyphs.GlyphsClassifier) -> GlyphsBench:
    return GlyphsBench(model=denoiser, classifier=classifier)


# -- data and prompts ----------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(seed=SEEDS, other=SEEDS, split=st.sampled_from(["train", "test"]))
def test_glyphs_are_a_function_of_the_seed(seed: int, other: int, split: str) -> None:
    a, b = glyphs.make_glyphs(12, seed, split), glyphs.make_glyphs(12, seed, split)
    assert torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)
    assert a.images.shape == (12, 1, 16, 16) and a.images.dtype == torch.float32
    assert float(a.images.min()) >= -1.0 and float(a.images.max()) <= 1.0
    if other != seed:
        assert not torch.equal(a.images, glyphs.make_glyphs(12, other, split).images)


def test_glyphs_reach_both_range_bounds_and_follow_their_prompt() -> None:
    g = glyphs.make_glyphs(200, seed=1, digits=torch.arange(10).repeat(20), textures=torch.arange(5).repeat(40))
    assert torch.equal(g.digits, torch.arange(10).repeat(20)) and torch.equal(g.textures, torch.arange(5).repeat(40))
    # dark texture cells sit at -1 exactly; the brightest strokes reach +1 (brightness up to 1)
    assert float(g.images.min()) == -1.0 and float(g.images.max()) > 0.95
    assert torch.equal(g.tokens, torch.stack([g.digits, g.textures], 1))


def test_textures_are_distinct_period_4_patterns() -> None:
    zero = torch.zeros(len(glyphs.TEXTURES), dtype=torch.int64)
    patterns = texture_patterns(torch.arange(len(glyphs.TEXTURES)), zero, zero)
    flat = patterns.flatten(1)
    assert len({tuple(p.tolist()) for p in flat}) == len(glyphs.TEXTURES)
    assert torch.equal(patterns, patterns.roll(PERIOD, dims=2)) and torch.equal(patterns, patterns.roll(PERIOD, dims=3))
    # dots cover a quarter of the image, the others half
    assert flat.mean(1).tolist() == [0.5, 0.5, 0.5, 0.5, 0.25]


def test_train_and_test_source_digits_are_disjoint() -> None:
    train, test = source_digits("train")[0].flatten(1), source_digits("test")[0].flatten(1)
    assert len(train) == 1437 and len(test) == 360
    assert torch.cdist(test, train).min() > 0


def test_prompts_encode_and_refuse_by_name() -> None:
    assert glyphs.encode_prompt("digit=3, texture=stripes45").tolist() == [[3, 2]]
    assert glyphs.encode_prompt("[texture=dots digit=7]").tolist() == [[7, 4]]
    assert glyphs.encode_prompt("texture=dots", n=2).tolist() == [[glyphs.NULL_DIGIT, 4]] * 2
    assert glyphs.encode_prompt("").tolist() == [[glyphs.NULL_DIGIT, glyphs.NULL_TEXTURE]]
    for bad, message in (
        ("digit=12", "expected digit in 0..9"),
        ("texture=grain", "expected texture in"),
        ("digit=1 digit=2", "at most once"),
        ("colour=red", "expected items"),
    ):
        with pytest.raises(ConfigError, match=message):
            glyphs.encode_prompt(bad)
    with pytest.raises(ConfigError, match="digits: expected 3 values"):
        glyphs.make_glyphs(3, seed=0, digits=torch.tensor([1, 2]))
    with pytest.raises(ConfigError, match="split: expected"):
        glyphs.make_glyphs(3, seed=0, split="val")


def test_bench_labels_are_texture_major_prompts() -> None:
    digits, textures = label_prompts(torch.arange(50))
    assert digits[:10].tolist() == list(range(10)) and textures[:10].tolist() == [0] * 10
    assert textures[-1] == 4 and digits[-1] == 9


# -- the network -----------------------------------------------------------------------------------------
def test_attention_layers_have_the_documented_names(denoiser: glyphs.GlyphsUNet) -> None:
    levels = ("down1", "mid", "up1")
    expected = {f"{lv}.{kind}_attn": kind for lv in levels for kind in ("self", "cross")}
    assert denoiser.attention_layers() == expected
    modules = dict(denoiser.named_modules())
    for name in expected:
        assert isinstance(modules[f"{name}.attn"], nn.MultiheadAttention)
    assert modules["mid.cross_attn.attn"].kdim == denoiser.config.token_dim


def test_model_checks_its_inputs(denoiser: glyphs.GlyphsUNet) -> None:
    with pytest.raises(ShapeError, match=r"x: expected \(b, 1, 16, 16\)"):
        denoiser(torch.zeros(2, 1, 8, 8), 10, glyphs.encode_prompt("", 2))
    with pytest.raises(ShapeError, match=r"tokens: expected \(2, 2\)"):
        denoiser(torch.zeros(2, 1, 16, 16), 10, torch.zeros(3, 2, dtype=torch.int64))


def test_the_prompt_changes_the_prediction(denoiser: glyphs.GlyphsUNet) -> None:
    """Through cross-attention only: the texture token alone moves the prediction at mid noise."""
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = denoiser(x, 500, glyphs.encode_prompt("texture=stripes0", 4))
        b = denoiser(x, 500, glyphs.encode_prompt("texture=stripes90", 4))
    assert (a - b).abs().mean() > 1e-2


# -- shipped checkpoints -----------------------------------------------------------------------------------
def test_classifier_reproduces_its_recorded_figures(classifier: glyphs.GlyphsClassifier) -> None:
    record = glyphs.checkpoint_record(glyphs.CLASSIFIER)
    figures = record["held_out"]
    assert classifier_figures(classifier, n=figures["n"]) == figures
    assert figures["digit_accuracy"] >= 0.98 and figures["texture_accuracy"] >= 0.98
    assert record["training_command"].startswith("python -m guidekit.zoo.glyphs.train")


def test_denoiser_reproduces_its_recorded_loss(denoiser: glyphs.GlyphsUNet) -> None:
    record = glyphs.checkpoint_record()
    assert record["parameters"] == sum(p.numel() for p in denoiser.parameters())
    assert held_out_loss(denoiser) == pytest.approx(record["held_out"]["eps_loss"], abs=1e-5)
    assert record["recipe"]["seed"] == 0 and "training_command" in record


def test_a_missing_checkpoint_names_the_training_command(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"python -m guidekit\.zoo\.glyphs\.train"):
        glyphs.load_denoiser(tmp_path)


# -- metrics -------------------------------------------------------------------------------------------------
def test_metrics_of_real_glyphs(classifier: glyphs.GlyphsClassifier) -> None:
    reference = glyphs_reference(classifier, per_prompt=4)
    real = glyphs.make_glyphs(200, seed=99, split="test", digits=torch.arange(10).repeat(20),
                              textures=torch.arange(5).repeat_interleave(40))  # fmt: skip
    m = glyph_metrics(real.images, real.digits, real.textures, classifier, reference)
    assert m["digit_acc"] > 0.95 and m["texture_acc"] > 0.95 and m["sat"] == 0.0
    assert m["spec_err"] < 0.15
    # the wrong texture requested: the texture head and the spectral error both notice
    wrong = glyph_metrics(real.images, real.digits, (real.textures + 1) % 5, classifier, reference)
    assert wrong["texture_acc"] < 0.05 and wrong["spec_err"] > 3 * m["spec_err"]
    # amplified samples saturate
    loud = glyph_metrics(1.5 * real.images, real.digits, real.textures, classifier, reference)
    assert loud["sat"] > 0.3 and loud["spec_err"] > m["spec_err"]


def test_high_pass_spectrum_ignores_the_mean() -> None:
    x = glyphs.make_glyphs(10, seed=3).images
    torch.testing.assert_close(high_pass_spectrum(x + 0.5), high_pass_spectrum(x))


# -- sampling ------------------------------------------------------------------------------------------------
def test_cfg_3_samples_follow_their_prompt(bench: GlyphsBench) -> None:
    """A few-step sample is prompt-consistent: at CFG 3 both heads mostly read the requested values, far
    above the unconditional model's chance level (0.1 for the digit, 0.2 for the texture)."""
    guided = bench.run(gk.CFG(3.0), FEW, seed=0).metrics
    plain = bench.run(gk.CFG(0.0), FEW, seed=0).metrics
    assert guided["digit_acc"] >= 0.8 and guided["texture_acc"] >= 0.9, guided
    assert guided["acc"] > plain["acc"] + 0.4
    assert guided["nfe"] == 2 * FEW.steps


def test_negative_prompt_lowers_the_excluded_texture(denoiser, classifier) -> None:
    """Digit-only prompts at CFG 3: with ``uncond = [null, dots]`` far fewer samples come out dotted."""
    setting = Settings(sampler="ddim", steps=10, per_class=6, schedule="trailing")
    plain = GlyphsBench(free_texture=True, watch="dots", model=denoiser, classifier=classifier, reference_per_prompt=2)
    negative = GlyphsBench(negative="dots", model=denoiser, classifier=classifier, reference_per_prompt=2)
    before = plain.run(gk.CFG(3.0), setting, seed=0).metrics
    after = negative.run(gk.CFG(3.0), setting, seed=0).metrics
    assert before["neg_rate"] >= 0.1, before
    assert after["neg_rate"] <= 0.5 * before["neg_rate"], (before, after)
    assert after["digit_acc"] >= 0.7


def test_bench_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="negative: expected a texture"):
        GlyphsBench(negative="grain")
    with pytest.raises(ConfigError, match="watch: expected it only with free_texture"):
        GlyphsBench(free_texture=False, watch="dots")


@pytest.mark.parametrize(
    "name, params",
    [
        ("pag", {"layers": ["mid.self_attn"]}),
        ("seg", {"layers": ["self_attn"]}),
        ("slg", {"layers": ["mid.cross_attn", "up1.self_attn"]}),
        ("nag", {"layers": ["cross_attn"]}),
    ],
)
def test_attention_guidance_runs_on_the_named_layers(denoiser: glyphs.GlyphsUNet, name: str, params: dict) -> None:
    """PAG, SEG, SLG and NAG act on the glyphs U-net through the native backend, selected by layer name:
    the result differs from CFG alone, and the model is restored afterwards."""
    tokens = glyphs.encode_prompt("digit=4, texture=checks", 2)
    x_T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    kwargs = {"steps": 3, "cond": tokens, "uncond": glyphs.encode_prompt("", 2), "prediction": "eps",
              "alphas_cumprod": denoiser.alphas_cumprod, "sampler": "ddim", "progress": False}  # fmt: skip
    with torch.no_grad():
        base = gk.sample(denoiser, x_T, strategy=gk.CFG(3.0), **kwargs)
        strategy = gk.build({"name": name, "params": {"inner": {"name": "cfg", "params": {"scale": 3.0}}, **params}})
        out = gk.sample(denoiser, x_T, strategy=strategy, **kwargs)
        again = gk.sample(denoiser, x_T, strategy=gk.CFG(3.0), **kwargs)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3
    torch.testing.assert_close(again, base)


def test_pag_with_the_bare_mid_selector_perturbs_only_the_self_attention(denoiser: glyphs.GlyphsUNet) -> None:
    """``"mid"`` picks ``mid.self_attn.attn`` and ``mid.cross_attn.attn``; identity attention leaves the
    cross-attention call as it is, so it equals ``"mid.self_attn"``."""
    tokens = glyphs.encode_prompt("digit=4", 1)
    kw = dict(steps=2, cond=tokens, uncond=glyphs.encode_prompt("", 1), prediction="eps",
              alphas_cumprod=denoiser.alphas_cumprod, progress=False)  # fmt: skip
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    bare = gk.sample(denoiser, x, strategy=gk.PAG(gk.CFG(3.0), 1.0, ("mid",)), **kw)
    named = gk.sample(denoiser, x, strategy=gk.PAG(gk.CFG(3.0), 1.0, ("mid.self_attn",)), **kw)
    assert torch.equal(bare, named)
    assert not torch.allclose(bare, gk.sample(denoiser, x, strategy=gk.CFG(3.0), **kw), atol=1e-4)


# -- the command line ---------------------------------------------------------------------------------------
def test_guidekit_demo_model_glyphs(tmp_path, capsys) -> None:
    from guidekit.cli import main

    out = tmp_path / "demo"
    argv = ["demo", "--model", "glyphs", "--out", str(out), "--per-class", "1", "--steps", "2", "--only", "cfg", "pag"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "pag scale=1 cfg=3" in printed and "neg_rate" in printed
    names = {p.name for p in out.iterdir()}
    assert {"metrics.txt", "metrics.json", "grid.png", "frontier.png", "negative.txt", "negative-grid.png"} <= names
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["model"] == "glyphs" and meta["settings"]["per_class"] == 1
    assert [s["label"] for s in meta["strategies"]] == [
        "cfg scale=1",
        "cfg scale=3",
        "cfg scale=5",
        "pag scale=1 cfg=3",
    ]
    assert main(["demo", "--model", "glyphs", "--video", "--out", str(tmp_path / "v")]) == 2
    assert "--model: expected digits with --video" in capsys.readouterr().err


def test_guidekit_compare_model_glyphs(tmp_path, capsys) -> None:
    from guidekit.cli import main

    out = tmp_path / "compare"
    argv = ["compare", "--model", "glyphs", "-s", "cfg:scale=3", "--out", str(out), "--per-class", "1", "--steps", "2"]
    assert main(argv) == 0
    assert "spec_err" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["model"] == "glyphs"
