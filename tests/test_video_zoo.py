"""The embedded video model: moving-digit data, video metrics, checkpoints, both 5-D layouts, the demo."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import guidekit as gk
from guidekit.energy import MinMax
from guidekit.errors import ConfigError, ShapeError
from guidekit.metrics.video import (
    class_flicker,
    label_switch_rate,
    motion_compensated_difference,
    video_metrics,
    video_reference,
)
from guidekit.zoo import video
from guidekit.zoo.video.demo import COLUMNS, main, run_video_demo
from guidekit.zoo.video.figures import classifier_accuracy, denoise_mse

SEEDS = st.integers(min_value=0, max_value=2**31 - 1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small 3-D convolutions on a shared 2-core machine run up to 50x slower with 2 OpenMP threads than with
    one when the other core is busy (spinning barriers); these tests use one thread and restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def denoiser() -> video.VideoDenoiser:
    return video.load_denoiser()


@pytest.fixture(scope="module")
def classifier() -> video.FrameClassifier:
    return video.load_classifier()


@pytest.fixture(scope="module")
def reference(classifier: video.FrameClassifier):
    return video.real_reference(classifier)[0]


# -- data ---------------------------------------------------------------------------------------------
@settings(max_examples=20)
@given(seed=SEEDS, other=SEEDS, split=st.sampled_from(["train", "test"]))
def test_clips_are_a_function_of_the_seed(seed: int, other: int, split: str) -> None:
    a, b = video.make_clips(3, seed, split), video.make_clips(3, seed, split)
    assert torch.equal(a.video, b.video) and torch.equal(a.labels, b.labels) and torch.equal(a.source, b.source)
    assert a.video.shape == (3, 1, 8, 16, 16) and a.video.dtype == torch.float32
    assert float(a.video.min()) >= -1.0 and float(a.video.max()) <= 1.0
    if other != seed:
        assert not torch.equal(a.video, video.make_clips(3, other, split).video)


@settings(max_examples=10)
@given(seed=SEEDS, labels=st.lists(st.integers(0, 9), min_size=1, max_size=6))
def test_requested_labels_come_from_their_class(seed: int, labels: list[int]) -> None:
    clips = video.make_clips(len(labels), seed, "test", labels=torch.tensor(labels))
    assert clips.labels.tolist() == labels
    _, sprite_labels = video.digit_sprites("test")
    assert sprite_labels[clips.source].tolist() == labels


def test_motion_config_shapes_the_clips() -> None:
    clips = video.make_clips(2, seed=0, motion=video.MotionConfig(frames=4, size=12, centre=(5.0, 7.0)))
    assert clips.video.shape == (2, 1, 4, 12, 12)
    still = video.make_clips(2, seed=0, motion=video.MotionConfig(centre=(8.0, 8.0), scale=(1, 1), brightness=(1, 1)))
    assert float(motion_compensated_difference(still.video).max()) == 0.0  # no motion, no drift: a static clip


def test_bad_data_arguments_name_themselves() -> None:
    with pytest.raises(ConfigError, match="frames: expected an int >= 2, got 1"):
        video.MotionConfig(frames=1)
    with pytest.raises(ConfigError, match=r"scale: expected \(lo, hi\) with lo <= hi, got \(2.0, 1.0\)"):
        video.MotionConfig(scale=(2.0, 1.0))
    with pytest.raises(ConfigError, match="brightness: expected a range inside"):
        video.MotionConfig(brightness=(0.5, 1.5))
    with pytest.raises(ConfigError, match="n: expected a positive int, got 0"):
        video.make_clips(0, seed=0)
    with pytest.raises(ConfigError, match="split: expected 'train' or 'test', got 'val'"):
        video.make_clips(2, seed=0, split="val")
    with pytest.raises(ConfigError, match=r"labels: expected 2 classes in 0..9, got \[3, 12\]"):
        video.make_clips(2, seed=0, labels=torch.tensor([3, 12]))


def test_train_and_test_source_digits_are_disjoint() -> None:
    train, _ = video.digit_sprites("train")
    test, _ = video.digit_sprites("test")
    assert (len(train), len(test)) == (1437, 360)
    # the zoo's split is by source image: no test sprite is the same array as the train sprite at any index
    same = (train.flatten(1)[:, None] == test.flatten(1)[None]).all(-1)
    assert int(same.sum()) <= 2  # sklearn's digits hold a couple of exact duplicate images, no more


def test_clips_move_and_stay_the_same_digit() -> None:
    clips = video.make_clips(64, seed=5, split="test")
    frames = clips.video[:, 0]
    # intensity-weighted centroids move along a straight line at constant speed (up to bilinear rendering)
    weight = (frames + 1).clamp_min(0)
    grid = torch.arange(16, dtype=torch.float32)
    cx = (weight * grid).sum((-1, -2)) / weight.sum((-1, -2))
    steps = cx[:, 1:] - cx[:, :-1]
    assert float(steps.abs().max()) < 1.5  # sub-pixel to ~1 px per frame
    assert float((steps - steps.mean(1, keepdim=True)).abs().mean()) < 0.1
    assert float((frames[:, -1] - frames[:, 0]).abs().mean()) > 0.01  # something moves


@settings(max_examples=15)
@given(seed=SEEDS, dx=st.integers(-2, 2), dy=st.integers(-2, 2))
def test_integer_motion_renders_shifted_frames_with_zero_compensated_difference(seed: int, dx: int, dy: int) -> None:
    sprites, _ = video.digit_sprites("train")
    sprite = sprites[seed % len(sprites)][None]
    start = torch.tensor([8.0, 8.0])
    centre = torch.stack([start + torch.tensor([dx, dy]) * t for t in range(3)])[None]
    clip = video.render_clips(sprite, centre, torch.ones(1, 3), torch.ones(1, 3))
    assert torch.allclose(clip[0, 0, 1], torch.roll(clip[0, 0, 0], (dy, dx), dims=(0, 1)), atol=1e-6)
    assert float(motion_compensated_difference(clip, max_shift=2)[0]) < 1e-12


# -- metrics ------------------------------------------------------------------------------------------
@settings(max_examples=30)
@given(
    seed=SEEDS,
    frames=st.integers(2, 6),
    side=st.integers(5, 12),
    channels=st.integers(1, 3),
    max_shift=st.integers(0, 2),
)
def test_static_clip_has_zero_motion_compensated_difference(
    seed: int, frames: int, side: int, channels: int, max_shift: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    frame = torch.rand((2, channels, 1, side, side), generator=g) * 2 - 1
    clip = frame.expand(2, channels, frames, side, side)
    assert torch.equal(motion_compensated_difference(clip, max_shift), torch.zeros(2, dtype=torch.float64))
    noisy = clip + 0.3 * torch.randn(clip.shape, generator=g)
    assert bool((motion_compensated_difference(noisy, max_shift) > 0).all())


@settings(max_examples=30)
@given(seed=SEEDS, shifts=st.lists(st.tuples(st.integers(-2, 2), st.integers(-2, 2)), min_size=1, max_size=4))
def test_translated_clip_has_zero_motion_compensated_difference(seed: int, shifts: list[tuple[int, int]]) -> None:
    g = torch.Generator().manual_seed(seed)
    canvas = torch.zeros(1, 1, 20, 20)
    canvas[..., 8:12, 8:12] = torch.rand((1, 1, 4, 4), generator=g)  # content far from the border
    frames, pos = [canvas], (0, 0)
    for dy, dx in shifts:
        pos = (pos[0] + dy, pos[1] + dx)
        frames.append(torch.roll(canvas, pos, dims=(-2, -1)))
    clip = torch.stack(frames, dim=2)
    assert float(motion_compensated_difference(clip, max_shift=2).max()) < 1e-12
    if any(max(abs(dy), abs(dx)) > 0 for dy, dx in shifts):  # without compensation the frames differ
        assert float(motion_compensated_difference(clip, max_shift=0).max()) > 0


@settings(max_examples=30)
@given(
    seed=SEEDS,
    gain=st.floats(0.1, 10.0),
    offset=st.floats(-3.0, 3.0),
    layout=st.sampled_from(["b c f h w", "b f c h w"]),
)
def test_relative_difference_ignores_contrast(seed: int, gain: float, offset: float, layout: str) -> None:
    g = torch.Generator().manual_seed(seed)
    clip = torch.rand((2, 2, 4, 9, 9), generator=g, dtype=torch.float64)
    if layout == "b f c h w":
        clip = clip.transpose(1, 2)
    absolute = motion_compensated_difference(clip, 1, layout)
    torch.testing.assert_close(motion_compensated_difference(gain * clip + offset, 1, layout), gain**2 * absolute)
    relative = motion_compensated_difference(clip, 1, layout, relative=True)
    torch.testing.assert_close(motion_compensated_difference(gain * clip + offset, 1, layout, relative=True), relative)
    canonical = clip if layout == "b c f h w" else clip.transpose(1, 2)
    torch.testing.assert_close(motion_compensated_difference(canonical, 1, relative=True), relative)


@settings(max_examples=20)
@given(seed=SEEDS, frames=st.integers(2, 6), classes=st.integers(2, 5))
def test_class_flicker_and_switches(seed: int, frames: int, classes: int) -> None:
    g = torch.Generator().manual_seed(seed)
    steady = torch.softmax(torch.randn((3, 1, classes), generator=g), -1).expand(3, frames, classes)
    assert torch.equal(class_flicker(steady), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(label_switch_rate(steady), torch.zeros(3, dtype=torch.float64))
    onehot = torch.eye(classes)[torch.arange(frames) % 2][None]  # flips class 0 <-> 1 every frame
    assert float(label_switch_rate(onehot)[0]) == 1.0
    expected = 2 * torch.tensor([0.0, 1.0]).repeat(frames)[:frames].var(unbiased=False)
    assert torch.allclose(class_flicker(onehot), expected.double())


def test_real_clips_against_themselves(classifier: video.FrameClassifier) -> None:
    real = video.make_clips(40, seed=3, split="test", labels=video.balanced_labels(4))
    ref = video_reference(classifier, real.video)
    m = video_metrics(real.video, real.labels, classifier, ref)
    assert abs(m["fd"]) < 1e-6
    assert m["mc_ratio"] == pytest.approx(1.0) and m["flicker_ratio"] == pytest.approx(1.0)
    assert m["over_share"] == 0.0 and m["sat"] == 0.0
    # the same numbers in the CogVideoX layout
    bfchw = video_metrics(real.video.transpose(1, 2), real.labels, classifier, ref, layout="b f c h w")
    assert bfchw == pytest.approx(m)


def test_metric_errors_name_the_argument(classifier: video.FrameClassifier) -> None:
    with pytest.raises(ShapeError, match="video: expected a 5-D clip batch"):
        motion_compensated_difference(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ConfigError, match="max_shift: expected less than half"):
        motion_compensated_difference(torch.zeros(1, 1, 2, 4, 4), max_shift=2)
    with pytest.raises(ShapeError, match="probs: expected"):
        class_flicker(torch.ones(2, 10))
    real = video.make_clips(10, seed=3, split="test")
    ref = video_reference(classifier, real.video)
    with pytest.raises(ShapeError, match=r"labels: expected \(10,\)"):
        video_metrics(real.video, real.labels[:3], classifier, ref)


# -- model, checkpoints, layouts ------------------------------------------------------------------------
def test_model_checks_its_input(denoiser: video.VideoDenoiser) -> None:
    with pytest.raises(ShapeError, match=r"x: expected a clip batch 'b c f h w' = \(2, 1, 8, 16, 16\)"):
        denoiser(torch.zeros(2, 8, 1, 16, 16), 1.0, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ConfigError, match="layout: expected"):
        denoiser.with_layout("b h w c f")
    other = denoiser.with_layout("b f c h w")
    assert other.net is denoiser.net and other.clip_shape(2) == (2, 8, 1, 16, 16)


def test_classifier_reproduces_its_recorded_figures(classifier: video.FrameClassifier) -> None:
    check = video.checkpoint_record(video.CLASSIFIER)["figures"]["check"]
    assert classifier_accuracy(classifier, check["clips"], check["seed"]) == pytest.approx(check["frame_acc"], abs=1e-6)
    assert video.checkpoint_record(video.CLASSIFIER)["figures"]["frame_acc_test"] > 0.9


def test_denoiser_reproduces_its_recorded_figures(
    denoiser: video.VideoDenoiser, classifier: video.FrameClassifier, reference
) -> None:
    record = video.checkpoint_record()
    check = record["figures"]["check"]
    mse = denoise_mse(denoiser, 8, seed=12, sigmas=(0.2, 2.0))
    for key in ("cond", "uncond"):
        assert mse[key] == pytest.approx(check["denoise_mse"][key], rel=1e-3)
    # the null label knows less than the class label at high noise
    assert mse["cond"]["2.0"] < mse["uncond"]["2.0"]
    setting = video.EvalSetting(**check["setting"])
    metrics, _ = video.evaluate(denoiser, classifier, reference, None, setting)
    for key, value in check["cond"].items():
        assert metrics[key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
    assert record["parameters"] == sum(p.numel() for p in denoiser.parameters())


@pytest.mark.parametrize(
    "strategy",
    [gk.CFG(3.0), gk.SAMG(w=3.0, transforms=(MinMax(over="frame"),)), gk.APG(scale=3.0, norm_threshold=2.0)],
    ids=["cfg", "samg-frame", "apg"],
)
def test_both_layouts_give_the_same_clips(denoiser: video.VideoDenoiser, strategy: gk.GuidanceStrategy) -> None:
    labels = torch.tensor([3, 7])
    a = video.sample_clips(denoiser, labels, strategy, steps=3, sampler="euler", seed=1)
    b = video.sample_clips(denoiser, labels, strategy, steps=3, sampler="euler", seed=1, layout="b f c h w")
    assert b.shape == (2, 8, 1, 16, 16)
    torch.testing.assert_close(b.transpose(1, 2), a, rtol=1e-5, atol=1e-5)
    # a clip does not depend on the batch it is sampled in
    alone = video.sample_clips(denoiser, labels[:1], strategy, steps=3, sampler="euler", seed=1)
    torch.testing.assert_close(alone, a[:1], rtol=1e-5, atol=1e-5)


# -- the demo -------------------------------------------------------------------------------------------
def test_video_demo_end_to_end(tmp_path) -> None:
    setting = video.EvalSetting(per_class=1, steps=2, sampler="euler", layout="b f c h w")
    rows = run_video_demo(tmp_path, setting=setting, reference_clips=20, progress=False)
    names = ["real", "cfg", "samg-clip", "samg-frame", "apg", "interval"]
    assert list(rows) == names
    for name in names:
        gif = Image.open(tmp_path / f"{name}.gif")
        assert gif.n_frames == 8
        assert (tmp_path / f"{name}_strip.png").exists()
        assert set(COLUMNS) <= set(rows[name])
    table = (tmp_path / "metrics.md").read_text()
    assert all(f"| {name} |" in table for name in names)
    assert json.loads((tmp_path / "metrics.json").read_text())["setting"]["layout"] == "b f c h w"


def test_video_demo_command_line(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--per-class", "1", "--steps", "1", "--sampler", "euler", "--reference-clips", "10"]
    assert main(argv) == 0
    assert "| samg-frame |" in capsys.readouterr().out
    assert (out / "cfg.gif").exists()


def test_guidekit_demo_video(tmp_path, capsys) -> None:
    from guidekit.cli import main as cli_main

    out = tmp_path / "cli"
    argv = ["demo", "--video", "--out", str(out), "--per-class", "1", "--steps", "1", "--only", "cfg", "samg-frame"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "| samg-frame |" in printed and "| apg |" not in printed
    assert sorted(p.name for p in out.glob("*.gif")) == ["cfg.gif", "real.gif", "samg-frame.gif"]
    assert cli_main(["demo", "--video", "--out", str(out), "--only", "nope"]) == 2
    assert "--only: expected names among" in capsys.readouterr().err
