"""Shared set-up for the sampler / loop / oracle tests: one small oracle and its reference sets, and the
three-class batch (``GM``, ``LABELS``, ``UNCONDS``, ``x_T``) the per-strategy loop tests sample."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from torch import Tensor

from guidekit.oracle import UNCOND, GaussianMixture, energy_distance

F64 = torch.float64


@cache
def mixture(event_shape: tuple[int, ...] = (2, 4, 4)) -> GaussianMixture:
    """3 classes x 2 components in an image-shaped event (D = 32 by default)."""
    return GaussianMixture.random(3, 2, event_shape, spread=3.0, std=0.5, seed=0)


@cache
def references(n: int = 2000, label: int = 0, event_shape: tuple[int, ...] = (2, 4, 4)) -> tuple[Tensor, Tensor]:
    """Two independent exact sample sets of class ``label`` (the second gives the noise floor)."""
    gm = mixture(event_shape)
    g = torch.Generator().manual_seed(1234)
    return gm.sample(label, n, generator=g), gm.sample(label, n, generator=g)


def noise(n: int, event_shape: tuple[int, ...] = (2, 4, 4), seed: int = 7) -> Tensor:
    return torch.randn(n, *event_shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.fixture(autouse=True)
def single_thread():
    """Run with one torch thread: these tensors are small, and two threads on a loaded machine are 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@cache
def floors(n: int = 2000, label: int = 0, shape: tuple[int, ...] = (2, 4, 4), draws: int = 4) -> tuple[float, float]:
    """The noise floor of :func:`distances`: the mean energy distance of ``draws`` independent exact sets to the
    reference (full, projected). A single draw scatters by about 2x around it."""
    gm = mixture(shape)
    ref, _ = references(n, label, shape)
    full, proj = [], []
    for k in range(draws):
        other = gm.sample(label, n, generator=torch.Generator().manual_seed(99 + k))
        full.append(energy_distance(other, ref))
        proj.append(energy_distance(gm.project(other), gm.project(ref)))
    return sum(full) / draws, sum(proj) / draws


def distances(x: Tensor, event_shape: tuple[int, ...] = (2, 4, 4), label: int = 0) -> tuple[float, float]:
    """Energy distance of ``x`` to the reference over the floor: ``(full / floor, projected / floor)``."""
    gm = mixture(event_shape)
    ref, _ = references(x.shape[0], label, event_shape)
    floor, pfloor = floors(x.shape[0], label, event_shape)
    return energy_distance(x, ref) / floor, energy_distance(gm.project(x), gm.project(ref)) / pfloor


GM = GaussianMixture.random(num_classes=3, components=2, event_shape=(2, 3, 3), spread=2.0, std=0.4, seed=7)
LABELS = torch.tensor([0, 1, 2])
UNCONDS = torch.full((3,), UNCOND)


def x_T(seed: int = 0, dtype: torch.dtype = F64) -> Tensor:
    """Starting noise for one sample of each of ``GM``'s three classes."""
    return torch.randn(3, 2, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(seed)).to(dtype)
