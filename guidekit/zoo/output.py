"""A run's output files, all or nothing: written into a staging folder beside ``--out``, then moved into place.

* ``--out`` missing or empty: the staging folder is renamed to ``--out`` (one atomic rename).
* ``--out`` holding other files: the run's files are moved in one by one, with Ctrl-C held back and any
  failure rolled back, so the folder shows the previous complete run or the new one, never a mix.
* An earlier run in ``--out`` (the files listed in its ``.guidekit-run.json``, or any file named like a run
  output) is replaced only with ``force``; every other file in the folder is left alone.
* A failure or Ctrl-C before the move deletes the staging folder and leaves ``--out`` as it was.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from ..errors import ConfigError
from .cmdline import out_folder, writable_folder

__all__ = ["IMAGE_OUTPUTS", "INVERSE_OUTPUTS", "MANIFEST", "VIDEO_OUTPUTS", "StagedOutput"]

MANIFEST = ".guidekit-run.json"
"""Written last into every run folder: the names of the run's files (what ``force`` replaces next time)."""

IMAGE_OUTPUTS = ("metrics.txt", "metrics.csv", "metrics.json", "grid.png", "frontier.png", "scale-maps-*.png")
"""Names the image demo and ``compare`` write (``fnmatch`` patterns)."""

INVERSE_OUTPUTS = ("metrics.txt", "metrics.json", "grid.png", "measurement.png", "measurement.pt")
"""Names ``demo --task`` writes (an inverse problem: the measurement, the reconstructions, the metrics)."""

VIDEO_OUTPUTS = ("metrics.md", "metrics.json", "*.gif", "*_strip.png")
"""Names the video demo writes (``fnmatch`` patterns)."""


class StagedOutput:
    """``with StagedOutput(out, IMAGE_OUTPUTS, force) as folder:`` write into ``folder``; on success the files
    appear in ``out`` together; on an exception ``out`` stays as it was.

    The checks run when it is made, before any work: ``out`` is a folder path (not ``''``, not a file),
    holds no earlier run unless ``force``, can be written, and a staging folder can be made beside it.
    An ``OSError`` while writing (a full disk) becomes a :class:`ConfigError` naming ``argument``.
    """

    def __init__(self, out: str | Path, outputs: Sequence[str], force: bool = False, argument: str = "--out") -> None:
        self.target = out_folder(argument, out)
        self.outputs = (*outputs, MANIFEST)
        self.argument = argument
        earlier = self._earlier_run()
        if earlier and not force:
            files = [name for name in earlier if name != MANIFEST] or earlier
            shown = ", ".join(files[:4]) + (", ..." if len(files) > 4 else "")
            raise ConfigError(
                f"{argument}: expected a folder without an earlier run (pass --force to replace it), "
                f"got {str(out)!r} holding {shown}"
            )
        if self.target.exists():
            writable_folder(argument, self.target)  # a file written there now, so that /proc fails before the work
        parent = self.target.absolute().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            # beside the target, unless the target is another filesystem (a mount point): renames stay on one
            same = not self.target.exists() or self.target.stat().st_dev == parent.stat().st_dev
            home = parent if same else self.target
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".guidekit-tmp", dir=home))
        except OSError as exc:
            raise ConfigError(
                f"{argument}: expected a folder that can be written, got {str(out)!r} ({exc.strerror or exc})"
            ) from None

    def __enter__(self) -> Path:
        return self.staging

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if exc is None:
                self._commit()
        except OSError as error:
            exc = error
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
        if not isinstance(exc, OSError):
            return
        if kind is None or exc.filename is None or str(self.staging) in str(exc.filename):  # the move or a writer
            raise ConfigError(
                f"{self.argument}: expected to write the run into {str(self.target)!r}, "
                f"got {exc.strerror or exc}; the folder is as it was"
            ) from None

    def _earlier_run(self) -> list[str]:
        """Names of the files of an earlier run in the target: its manifest's list and any output-like name."""
        if not self.target.is_dir():
            return []
        names = {p.name for p in self.target.iterdir() if p.is_file()}
        earlier = {n for n in names if any(fnmatch.fnmatchcase(n, pattern) for pattern in self.outputs)}
        try:
            listed = json.loads((self.target / MANIFEST).read_text())["files"]
            earlier |= names & set(listed)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no manifest, or not ours: the names alone decide
        return sorted(earlier)

    def _commit(self) -> None:
        files = sorted(p.name for p in self.staging.iterdir())
        (self.staging / MANIFEST).write_text(json.dumps({"files": files}, indent=2) + "\n")
        with _ctrl_c_held_back():
            if not self.target.exists() or not (self.target.is_symlink() or any(self.target.iterdir())):
                if self.target.exists():
                    self.target.rmdir()
                os.rename(self.staging, self.target)
                return
            self._swap([*files, MANIFEST])

    def _swap(self, new: list[str]) -> None:
        """Move the earlier run's files aside, the new ones in (the manifest last); undo all on a failure."""
        aside = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".guidekit-old", dir=self.staging.parent))
        moved_out: list[str] = []
        moved_in: list[str] = []
        try:
            for name in self._earlier_run():
                os.replace(self.target / name, aside / name)
                moved_out.append(name)
            for name in new:
                os.replace(self.staging / name, self.target / name)
                moved_in.append(name)
        except BaseException:
            for name in reversed(moved_in):
                os.replace(self.target / name, self.staging / name)
            for name in reversed(moved_out):
                os.replace(aside / name, self.target / name)
            aside.rmdir()
            raise
        shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def _ctrl_c_held_back() -> Iterator[None]:
    """Delay Ctrl-C until the block is done (the few renames of a commit), then raise it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before if before is not None else signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt
