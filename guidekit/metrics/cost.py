"""Cost of a run: network evaluations per sample (NFE) and wall time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from torch import Tensor

__all__ = ["CallCounter"]


class CallCounter:
    """Wrap a model ``f(x, *args, **kwargs)`` and count the rows of ``x`` it evaluates, and the time it takes.

    ``nfe(n)`` is the network evaluations per sample for a run of ``n`` samples: a batched ``[cond; uncond]``
    forward of ``2n`` rows counts 2, a conditional-only forward counts 1 (the saving of interval guidance).
    """

    def __init__(self, model: Callable[..., Tensor]) -> None:
        self.model = model
        self.rows = 0
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        start = time.perf_counter()
        out = self.model(x, *args, **kwargs)
        self.seconds += time.perf_counter() - start
        self.rows += int(x.shape[0])
        self.calls += 1
        return out

    def __getattr__(self, name: str) -> Any:  # expose the model's attributes (alphas_cumprod, prediction ...)
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def nfe(self, num_samples: int) -> float:
        """Network evaluations per sample so far."""
        return self.rows / num_samples

    def reset(self) -> None:
        """Zero the counters."""
        self.rows, self.calls, self.seconds = 0, 0, 0.0
