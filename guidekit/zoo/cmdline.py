"""Checks shared by the command-line tools (``guidekit``, ``python -m guidekit.zoo.*``, the benchmarks).

Every check runs before any work and raises a :class:`~guidekit.errors.GuidekitError` whose message names
the argument, what was expected and what was received; :func:`guarded` turns those (and ``OSError``) into
one line ``<prog>: error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import ConfigError, GuidekitError

__all__ = [
    "EXTRAS",
    "MissingExtraError",
    "at_least",
    "counts",
    "guarded",
    "out_folder",
    "require_extras",
    "seeds",
    "writable_folder",
]

EXTRAS = {"matplotlib": "matplotlib", "sklearn": "scikit-learn", "PIL": "pillow"}
"""Modules of the ``demo`` extra -> their package names on PyPI."""

SEED_LIMIT = 2**32
"""Seeds are integers in ``[0, 2**32)`` (torch takes up to 64 bits, but the benches add offsets to them)."""


class MissingExtraError(GuidekitError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require_extras(what: str, modules: Sequence[str], extra: str = "demo") -> None:
    """Import ``modules`` now, or raise :class:`MissingExtraError` naming ``what`` needs them and the extra."""
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(EXTRAS.get(module, module))
    if missing:
        raise MissingExtraError(
            f"{what}: expected the {extra!r} extra ({', '.join(EXTRAS.get(m, m) for m in modules)}), "
            f"got {', '.join(missing)} not installed; install it with: pip install 'guidekit[{extra}]'"
        )


def at_least(argument: str, value: int, minimum: int = 1) -> int:
    """``value`` if it is an integer >= ``minimum``, else a :class:`ConfigError` naming ``argument``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{argument}: expected an integer >= {minimum}, got {value!r}")
    return value


def counts(args: argparse.Namespace, *names: str) -> None:
    """:func:`at_least` 1 for each parsed option ``names`` (``"per_class"`` is named ``--per-class``)."""
    for name in names:
        at_least(f"--{name.replace('_', '-')}", getattr(args, name))


def seeds(argument: str, values: Sequence[int]) -> list[int]:
    """``values`` if every one is an integer in ``[0, 2**32)``, else a :class:`ConfigError`."""
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < SEED_LIMIT:
            raise ConfigError(f"{argument}: expected integers in [0, 2**32 - 1 = {SEED_LIMIT - 1}], got {value!r}")
    return list(values)


def out_folder(argument: str, text: str | Path) -> Path:
    """The folder ``text`` names: refuses an empty string (``Path('')`` would be the current folder) and a file."""
    if not str(text).strip():
        raise ConfigError(f"{argument}: expected a folder path, got {str(text)!r}")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{argument}: expected a folder, got {str(text)!r}, which is a file")
    return path


def writable_folder(argument: str, text: str | Path) -> Path:
    """Create the folder ``text`` (and its parents) and check that a file can be written in it."""
    path = out_folder(argument, text)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".guidekit-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{argument}: expected a folder that can be written, got {str(text)!r} ({exc.strerror or exc})"
        ) from None
    return path


def guarded(prog: str, run: Callable[[], int | None]) -> int:
    """``run()`` (``None`` counts as 0); user errors and ``OSError`` as one line ``<prog>: error: ...``, exit 2.

    Ctrl-C prints ``<prog>: interrupted`` and gives 130; a closed stdout (``... | head``) ends quietly.
    """
    try:
        return int(run() or 0)
    except GuidekitError as exc:
        return _fail(prog, str(exc))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # a full disk, a vanished file: the environment, not a bug
        where = f"{exc.filename!r}: " if exc.filename else ""
        return _fail(prog, f"{where}expected a file operation to succeed, got {exc.strerror or exc}")


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)  # always one line
    return 2
