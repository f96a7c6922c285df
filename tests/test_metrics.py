"""Properties of the sample-quality metrics (guidekit.metrics)."""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch
from hypothesis import given
from hypothesis import strategies as st

from guidekit.errors import ConfigError, ShapeError
from guidekit.metrics import (
    CallCounter,
    Reference,
    class_accuracy,
    excess_over_frontier,
    feature_stats,
    frechet_distance,
    frechet_distance_from_stats,
    frontier_at,
    knn_precision_recall,
    mean_class_probability,
    overshoot,
    per_class_frechet_distance,
    sample_metrics,
)


@st.composite
def feature_sets(draw: st.DrawFn, same_size: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (n, d) feature sets with different means, scales and correlations."""
    d = draw(st.integers(1, 12))
    n = draw(st.integers(max(d + 2, 5), 60))
    m = n if same_size else draw(st.integers(2, 60))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mix_a, mix_b = torch.randn(d, d, generator=gen), torch.randn(d, d, generator=gen)
    shift = draw(st.floats(-5, 5)) * torch.randn(d, generator=gen)
    a = torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix_a.double()
    b = torch.randn(m, d, generator=gen, dtype=torch.float64) @ mix_b.double() + shift.double()
    return a, b


def _scipy_fd(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> float:
    """The pytorch-fid reference formula, with scipy's sqrtm."""
    mu_a, cov_a = a.mean(0).numpy(), torch.cov(a.T).reshape(a.shape[1], -1).numpy()
    mu_b, cov_b = b.mean(0).numpy(), torch.cov(b.T).reshape(b.shape[1], -1).numpy()
    cov_a = cov_a + eps * torch.eye(a.shape[1]).double().numpy()
    cov_b = cov_b + eps * torch.eye(a.shape[1]).double().numpy()
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * root.trace())


@given(feature_sets())
def test_fd_of_a_set_with_itself_is_zero(sets: tuple[torch.Tensor, torch.Tensor]) -> None:
    a, _ = sets
    scale = float(torch.cov(a.T).reshape(a.shape[1], -1).trace()) + 1.0
    assert abs(frechet_distance(a, a)) <= 1e-6 * scale


@given(feature_sets())
def test_fd_is_symmetric_non_negative_and_matches_scipy(sets: tuple[torch.Tensor, torch.Tensor]) -> None:
    a, b = sets
    ab, ba = frechet_distance(a, b), frechet_distance(b, a)
    scale = 1.0 + abs(ab)
    assert ab >= -1e-6 * scale
    assert abs(ab - ba) <= 1e-6 * scale
    assert abs(ab - _scipy_fd(a, b)) <= 1e-4 * scale


@given(feature_sets(), st.floats(-3, 3))
def test_fd_of_a_translated_copy_is_the_squared_shift(sets: tuple[torch.Tensor, torch.Tensor], t: float) -> None:
    a, _ = sets
    shift = torch.linspace(-1, 1, a.shape[1], dtype=torch.float64) * t
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.square().sum()), abs=1e-6, rel=1e-6)


@given(st.lists(st.tuples(st.floats(0.01, 10), st.floats(0.01, 10), st.floats(-3, 3)), min_size=1, max_size=8))
def test_fd_of_diagonal_gaussians_has_the_closed_form(params: list[tuple[float, float, float]]) -> None:
    var_a = torch.tensor([p[0] for p in params], dtype=torch.float64)
    var_b = torch.tensor([p[1] for p in params], dtype=torch.float64)
    mu_b = torch.tensor([p[2] for p in params], dtype=torch.float64)
    got = frechet_distance_from_stats(torch.zeros_like(mu_b), torch.diag(var_a), mu_b, torch.diag(var_b), eps=0.0)
    want = float(mu_b.square().sum() + (var_a.sqrt() - var_b.sqrt()).square().sum())
    assert got == pytest.approx(want, rel=1e-8, abs=1e-9)


def test_feature_stats_and_errors_name_the_argument() -> None:
    x = torch.randn(10, 3, dtype=torch.float64)
    mu, cov = feature_stats(x)
    assert torch.allclose(mu, x.mean(0)) and torch.allclose(cov, torch.cov(x.T))
    with pytest.raises(ShapeError, match=r"features_a: expected a \(n, d\) feature matrix, got \(10,\)"):
        frechet_distance(torch.randn(10), x)
    with pytest.raises(ShapeError, match="features_b: expected 3 columns like features_a, got 4"):
        frechet_distance(x, torch.randn(10, 4))
    with pytest.raises(ShapeError, match="at least 2 rows"):
        frechet_distance(x, torch.randn(1, 3))
    with pytest.raises(ShapeError, match="features_b: expected finite"):
        frechet_distance(x, torch.full((4, 3), float("nan")))


def test_per_class_fd_reports_each_shared_class() -> None:
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 2, generator=gen)
    labels = torch.arange(40) % 4
    got = per_class_frechet_distance(feats, labels, feats, labels)
    assert sorted(got) == [0, 1, 2, 3] and all(abs(v) < 1e-6 for v in got.values())
    moved = per_class_frechet_distance(feats + (labels == 2)[:, None] * 3.0, labels, feats, labels)
    assert moved[2] == pytest.approx(18.0, rel=1e-6) and abs(moved[1]) < 1e-6
    with pytest.raises(ShapeError, match="labels: expected"):
        per_class_frechet_distance(feats, labels[:5], feats, labels)


@given(feature_sets())
def test_knn_precision_recall_of_identical_sets_is_one(sets: tuple[torch.Tensor, torch.Tensor]) -> None:
    a, _ = sets
    assert knn_precision_recall(a, a.clone(), k=1) == (1.0, 1.0)


@given(feature_sets(), st.floats(1e3, 1e5))
def test_knn_precision_recall_of_far_sets_is_zero(sets: tuple[torch.Tensor, torch.Tensor], far: float) -> None:
    a, b = sets
    precision, recall = knn_precision_recall(a, b / (1 + b.abs().max()) + far, k=1)
    assert (precision, recall) == (0.0, 0.0)


@given(feature_sets(same_size=True), st.integers(1, 3))
def test_knn_a_subset_of_the_real_points_has_full_precision(sets: tuple[torch.Tensor, torch.Tensor], k: int) -> None:
    a, _ = sets
    precision, recall = knn_precision_recall(a, a[: max(k + 1, len(a) // 2)], k=k)
    assert precision == 1.0 and 0.0 < recall <= 1.0


def test_knn_rejects_a_k_not_below_the_set_size() -> None:
    with pytest.raises(ConfigError, match=r"k: expected an int in \[1, 2\] .*got 3"):
        knn_precision_recall(torch.randn(3, 2), torch.randn(5, 2), k=3)


@given(st.lists(st.floats(-3, 3), min_size=1, max_size=50))
def test_overshoot_counts_values_past_the_threshold(values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float64)
    share, excess = overshoot(x)
    assert share == pytest.approx(sum(abs(v) > 1.1 for v in values) / len(values))
    assert excess == pytest.approx(sum(max(abs(v) - 1, 0) for v in values) / len(values))
    assert overshoot(x.clamp(-1, 1)) == (0.0, 0.0)


def test_overshoot_threshold_below_the_limit_is_refused() -> None:
    with pytest.raises(ConfigError, match="threshold: expected a value >= limit"):
        overshoot(torch.zeros(3), threshold=0.5)


@given(st.integers(1, 30), st.integers(2, 10), st.integers(0, 2**31 - 1))
def test_accuracy_and_mean_probability(n: int, classes: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    logits = torch.randn(n, classes, generator=gen, dtype=torch.float64)
    p = mean_class_probability(logits, labels)
    assert 0.0 < p < 1.0
    assert class_accuracy(logits, labels) == pytest.approx(float((logits.argmax(1) == labels).double().mean()))
    confident = 100.0 * torch.nn.functional.one_hot(labels, classes).double()
    assert class_accuracy(confident, labels) == 1.0 and mean_class_probability(confident, labels) == pytest.approx(1.0)
    assert mean_class_probability(torch.zeros(n, classes), labels) == pytest.approx(1.0 / classes)


def test_accuracy_errors_name_the_arguments() -> None:
    with pytest.raises(ShapeError, match=r"expected \(n, classes\) and \(n,\), got \(3, 4\) and \(2,\)"):
        class_accuracy(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"labels: expected values in \[0, 3\]"):
        mean_class_probability(torch.zeros(2, 4), torch.tensor([0, 7]))


class _LinearProbe(torch.nn.Module):
    """A fixed 'classifier': features are the flattened image, logits a fixed projection."""

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = x.flatten(1)
        return f, f[:, :3] * 10


def test_sample_metrics_of_real_data_against_itself() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(60, 1, 1, 5, generator=gen) * 2 - 1
    labels = torch.arange(60) % 3
    images[:, 0, 0, :3] = -1
    images[torch.arange(60), 0, 0, labels] = 1.0  # the first three pixels code the label
    feats = images.flatten(1)
    refs = {"train": Reference(feats, labels), "test": Reference(feats[:30], labels[:30])}
    m = sample_metrics(images, labels, _LinearProbe(), refs)
    assert m["acc"] == 1.0 and m["p_y"] > 0.99
    assert abs(m["fd_train"]) < 1e-6 and m["fd_test"] > 0 and abs(m["cfd"]) < 1e-6
    assert m["precision"] == 1.0 and m["recall"] == 1.0 and m["over_share"] == 0.0
    pushed = sample_metrics(images * 1.5, labels, _LinearProbe(), refs)
    assert pushed["over_share"] > 0 and pushed["over_mean"] > 0
    assert pushed["acc"] == 1.0  # the classifier sees clamped samples
    with pytest.raises(ShapeError, match="references: expected a reference named 'train'"):
        sample_metrics(images, labels, _LinearProbe(), {"test": refs["test"]})


def test_call_counter_counts_rows_per_sample() -> None:
    model = CallCounter(lambda x, t: x * 2)
    model(torch.zeros(8, 1), 0)
    model(torch.zeros(4, 1), 0)
    assert model.calls == 2 and model.nfe(4) == 3.0 and model.seconds >= 0
    model.reset()
    assert model.rows == 0 and model.nfe(4) == 0.0


@given(feature_sets(), st.integers(1, 3))
def test_knn_with_precomputed_radii_is_the_same(sets: tuple[torch.Tensor, torch.Tensor], k: int) -> None:
    a, b = sets
    if len(b) <= k:
        b = torch.cat([b, b + 1.0])
    ref = Reference(a, torch.zeros(len(a), dtype=torch.long))
    assert knn_precision_recall(a, b, k=k, real_radii=ref.radii(k)) == knn_precision_recall(a, b, k=k)
    assert ref.radii(k) is ref.radii(k)  # cached
    with pytest.raises(ShapeError, match="real_radii: expected"):
        knn_precision_recall(a, b, k=k, real_radii=ref.radii(k)[1:])


@given(
    st.lists(st.floats(0.0, 1.0), min_size=2, max_size=8, unique=True),
    st.floats(-5, 5),
    st.floats(0, 10),
    st.floats(0, 1),
)
def test_frontier_interpolates_a_linear_curve_exactly(xs: list[float], slope: float, offset: float, t: float) -> None:
    xs = sorted(xs)
    ys = [offset + slope * x for x in xs]
    target = xs[0] + t * (xs[-1] - xs[0])
    assert frontier_at(xs, ys, target) == pytest.approx(offset + slope * target, abs=1e-9)
    for x, y in zip(xs, ys, strict=True):  # points of the frontier have no excess
        assert excess_over_frontier(x, y, xs, ys) == pytest.approx(0.0, abs=1e-9)
    assert excess_over_frontier(target, offset + slope * target + 1.5, xs, ys) == pytest.approx(1.5, abs=1e-9)


def test_frontier_outside_its_range_is_nan_and_bad_input_is_refused() -> None:
    assert math.isnan(frontier_at([0.9, 0.95, 0.99], [1.0, 2.0, 5.0], 0.995))
    assert frontier_at([0.9, 0.95, 0.94, 0.99], [1.0, 2.0, 2.5, 5.0], 0.945) == pytest.approx(1.9)  # first crossing
    with pytest.raises(ShapeError, match="expected two equally long non-empty sequences, got 2 and 1"):
        frontier_at([0.1, 0.2], [1.0], 0.15)
