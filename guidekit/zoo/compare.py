"""Run guidance strategies side by side on an embedded model and measure the samples.

Two benches share one interface: :class:`DigitsBench` (the shipped digits denoiser, measured with the
shipped classifier against the real train/test splits) and :class:`GMMBench` (the analytic Gaussian
mixture of :mod:`guidekit.oracle`, fitted to the digits, measured against its exact samples). For one seed
every strategy starts from the same noise, so differences between strategies are paired.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..guided import StepRecord, sample
from ..metrics import Reference, embed, overshoot, sample_metrics
from ..registry import SAMPLERS
from ..strategies.base import GuidanceStrategy
from .cmdline import at_least

__all__ = ["Bench", "DigitsBench", "GMMBench", "Run", "Settings"]


@dataclass(frozen=True)
class Settings:
    """How every strategy of a comparison is sampled (one setting for all, so results are comparable)."""

    sampler: str = "ddim"
    steps: int = 20
    per_class: int = 10
    schedule: str = "trailing"

    def __post_init__(self) -> None:
        SAMPLERS.get(self.sampler)  # unknown names fail here, with the closest match
        for name in ("steps", "per_class"):
            at_least(name, getattr(self, name))


@dataclass
class Run:
    """One strategy at one seed: raw samples (before any clamp), labels, metrics and the step records."""

    strategy: GuidanceStrategy
    seed: int
    samples: Tensor
    labels: Tensor
    metrics: dict[str, float]
    records: list[StepRecord] = field(default_factory=list)


class Bench(ABC):
    """A model plus the way its samples are measured.

    ``quality`` names the distance to the reference (lower is better) and ``fidelity`` the class
    fidelity (higher is better, at most 1); ``columns`` are all reported metrics in order;
    ``reference_name`` says what :meth:`reference_images` shows. One seed gives one noise tensor, so
    every strategy run at that seed starts from the same noise (paired comparisons).
    """

    name: str
    quality: str
    fidelity: str
    reference_name: str
    columns: tuple[str, ...]
    num_classes: int
    event_shape: tuple[int, ...]
    model: Any
    """A native ``model(x, t, labels)`` for :func:`guidekit.sample`."""

    def labels(self, per_class: int) -> Tensor:
        """``per_class`` samples of every class, class-major: ``0, 0, ..., 1, 1, ...``."""
        return torch.arange(self.num_classes).repeat_interleave(per_class)

    def run(
        self, strategy: GuidanceStrategy, settings: Settings, seed: int = 0, record_scale_maps: bool = False
    ) -> Run:
        """Sample ``settings.per_class`` images of every class with ``strategy`` from seed ``seed``'s noise."""
        labels = self.labels(settings.per_class)
        noise = torch.randn(len(labels), *self.event_shape, generator=torch.Generator().manual_seed(seed))
        records: list[StepRecord] = []
        start = time.perf_counter()
        with torch.no_grad():
            samples = sample(
                self.model,
                noise,
                sampler=settings.sampler,
                steps=settings.steps,
                strategy=strategy,
                schedule=settings.schedule,
                progress=False,
                callback=records.append,
                record_scale_maps=record_scale_maps,
                generator=torch.Generator().manual_seed(seed + 1),
                **self._branches(strategy, labels),
            )
        seconds = time.perf_counter() - start
        metrics = self.measure(samples, labels, seed)
        metrics["nfe"] = float(records[-1].nfe) if records else 0.0
        metrics["seconds"] = seconds
        return Run(strategy, seed, samples, labels, metrics, records)

    # -- what a bench provides --------------------------------------------------------------------------
    @abstractmethod
    def _branches(self, strategy: GuidanceStrategy, labels: Tensor) -> dict[str, Any]:
        """``cond``, ``uncond`` (and ``weak_model``, ``prediction``, ``alphas_cumprod``) for :func:`sample`."""

    @abstractmethod
    def measure(self, samples: Tensor, labels: Tensor, seed: int) -> dict[str, float]:
        """The metrics of raw ``samples`` generated for ``labels``."""

    @abstractmethod
    def reference_images(self, per_class: int) -> Tensor:
        """Real (or exact) samples, class-major like :meth:`labels`, to show beside the generated ones."""


class DigitsBench(Bench):
    """The shipped digits denoiser, measured with the shipped classifier against the real splits.

    Metrics: ``acc``, ``p_y``, ``fd_train``, ``fd_test``, ``cfd`` (mean per-class FD vs train),
    ``precision``/``recall`` (k=3 NN vs train), ``over_share`` (|x| > 1.1), ``over_mean``; plus ``nfe`` and
    ``seconds`` from :meth:`Bench.run`.
    """

    name = "digits"
    quality = "fd_test"
    fidelity = "p_y"
    reference_name = "test digits"
    columns = ("acc", "p_y", "fd_train", "fd_test", "cfd", "precision", "recall", "over_share", "over_mean")
    num_classes = 10
    event_shape = (1, 8, 8)

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        weak_model: torch.nn.Module | None = None,
        classifier: torch.nn.Module | None = None,
        directory: str | None = None,
    ) -> None:
        """Models default to the shipped checkpoints (in ``directory``, default the package's)."""
        from . import load_classifier, load_denoiser, load_digits, load_weak_denoiser

        self.model = load_denoiser(directory) if model is None else model
        self.weak_model = load_weak_denoiser(directory) if weak_model is None else weak_model
        self.classifier = load_classifier(directory) if classifier is None else classifier
        self.data = load_digits()
        self.references = {
            split: Reference(embed(self.classifier, images)[0], labels)
            for split, (images, labels) in (("train", self.data.split("train")), ("test", self.data.split("test")))
        }

    def _branches(self, strategy: GuidanceStrategy, labels: Tensor) -> dict[str, Any]:
        from .unet import NULL_CLASS

        common = {"prediction": "eps", "alphas_cumprod": self.model.alphas_cumprod, "cond": labels}
        if "weak" in strategy.models():
            return {**common, "weak_model": self.weak_model}
        return {**common, "uncond": torch.full_like(labels, NULL_CLASS)}

    def measure(self, samples: Tensor, labels: Tensor, seed: int) -> dict[str, float]:
        return sample_metrics(samples, labels, self.classifier, self.references)

    def reference_images(self, per_class: int) -> Tensor:
        images, labels = self.data.split("test")
        return torch.cat([images[labels == c][:per_class] for c in range(self.num_classes)])


class GMMBench(Bench):
    """The analytic Gaussian mixture (:class:`guidekit.oracle.GaussianMixture`) with digit-like means.

    Each class has two components whose means are the two k-means centroids of that class's train
    digits, with one shared standard deviation: ``std_scale`` times the within-cluster RMS, so that the
    classes overlap and guidance has something to do (at 3, ``p(y|x)`` is about 0.8 without guidance).
    Its predictions are exact, so every difference from the exact samples is the sampler's and the
    guidance's doing. Metrics: ``acc`` (Bayes classifier), ``p_y`` (exact posterior of the requested
    class), ``ed`` (energy distance of each class's samples to ``reference_factor`` times as many exact
    samples of that class, in the span of the means where the classes differ, averaged over classes),
    ``log_p`` (mean exact ``log p(x | y)`` per dimension), ``over_share`` / ``over_mean`` (pixels past the
    digits' range).
    """

    name = "gmm"
    quality = "ed"
    fidelity = "p_y"
    reference_name = "exact samples"
    columns = ("acc", "p_y", "ed", "log_p", "over_share", "over_mean")
    num_classes = 10
    event_shape = (1, 8, 8)

    def __init__(self, components: int = 2, std_scale: float = 3.0, reference_factor: int = 10, seed: int = 0) -> None:
        from ..oracle import GaussianMixture
        from . import load_digits

        data = load_digits()
        means, residuals = [], []
        for c in range(self.num_classes):
            x = data.train_images[data.train_labels == c].flatten(1).double()
            centres, assign = _kmeans(x, components, seed)
            means.append(centres)
            residuals.append(x - centres[assign])
        std = std_scale * float(torch.cat(residuals).square().mean().sqrt())
        self.reference_factor = reference_factor
        self.mixture = GaussianMixture(torch.stack(means).reshape(self.num_classes, components, *self.event_shape), std)
        self.model = self.mixture.as_model("eps")

    def _branches(self, strategy: GuidanceStrategy, labels: Tensor) -> dict[str, Any]:
        if "weak" in strategy.models():
            raise ConfigError(
                f"strategy: {type(strategy).__name__} needs a weak model, which the gmm bench does not have"
            )
        return {"prediction": "eps", "cond": labels, "uncond": torch.full_like(labels, -1)}

    def measure(self, samples: Tensor, labels: Tensor, seed: int) -> dict[str, float]:
        from ..oracle import energy_distance

        mix = self.mixture
        exact_labels = labels.repeat(self.reference_factor)
        exact = mix.project(mix.sample(exact_labels, generator=torch.Generator().manual_seed(10_000 + seed)))
        coords = mix.project(samples)
        per_class = [energy_distance(coords[labels == c], exact[exact_labels == c]) for c in labels.unique()]
        posterior = torch.stack(
            [self.mixture.class_posterior(samples, torch.full_like(labels, k)) for k in range(self.num_classes)], 1
        )
        share, mean_excess = overshoot(samples)
        return {
            "acc": float((posterior.argmax(1) == labels).double().mean()),
            "p_y": float(posterior.gather(1, labels[:, None]).mean()),
            "ed": sum(per_class) / len(per_class),
            "log_p": float(self.mixture.log_prob(samples, labels).mean()) / self.mixture.dim,
            "over_share": share,
            "over_mean": mean_excess,
        }

    def reference_images(self, per_class: int) -> Tensor:
        labels = self.labels(per_class)
        return self.mixture.sample(labels, generator=torch.Generator().manual_seed(0)).float()


def _kmeans(x: Tensor, k: int, seed: int, iterations: int = 50) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means from ``k`` seeded distinct rows: ``(centres (k, d), assignment (n,))``."""
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(len(x), generator=gen)[:k]].clone()
    assign = torch.zeros(len(x), dtype=torch.long)
    for _ in range(iterations):
        assign = torch.cdist(x, centres).argmin(1)
        new = torch.stack([x[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
        if torch.equal(new, centres):
            break
        centres = new
    return centres, assign
