"""Shared pytest set-up: hypothesis profiles, offline mode, deterministic torch."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

# Nothing may reach a model hub in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# "ci": derandomized, so a red CI run is reproducible; "dev": random, the same example budget.
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, max_examples=60, print_blob=True, **_common)
settings.register_profile("dev", max_examples=60, **_common)
settings.register_profile("thorough", max_examples=500, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# One thread: the tensors in tests are tiny, and a thread pool costs more than it saves (measured: tiny
# conv/matmul calls stalled 40-90 ms each with two threads on a busy 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Every test starts from the same torch RNG state, so a run (and a red CI run) is reproducible."""
    torch.manual_seed(0)


@pytest.fixture
def scale_functions() -> Iterator[Callable[[str, Callable[[float], float]], None]]:
    """``register(name, fn)`` into ``guidekit.registry.SCALE_FUNCTIONS`` for one test, removed after it."""
    from guidekit.registry import SCALE_FUNCTIONS

    names: list[str] = []

    def register(name: str, fn: Callable[[float], float]) -> None:
        SCALE_FUNCTIONS.register(name, fn)
        names.append(name)

    yield register
    for name in names:
        SCALE_FUNCTIONS.unregister(name)
