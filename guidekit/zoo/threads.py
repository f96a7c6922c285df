"""Run model work on a chosen number of torch CPU threads."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..errors import ConfigError

__all__ = ["torch_threads"]


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` torch CPU threads, then restore the previous number.

    Small convolutions on a busy 2-core CPU run fastest on one thread (two were measured up to 50x slower).
    """
    if not (isinstance(threads, int) and threads >= 1):
        raise ConfigError(f"--threads: expected an integer >= 1, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
