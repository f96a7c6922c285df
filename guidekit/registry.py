"""Name -> component registries, one per group, with lazy entry-point plugins.

Built-ins register in code (``@STRATEGIES.register("cfg")``). Third parties declare, in their
``pyproject.toml``::

    [project.entry-points."guidekit.strategies"]
    my-strategy = "my_package.module:MyStrategy"

Entry points are read on the first miss (or by :meth:`Registry.names`), never at import. A plugin that
fails to load is reported by name in a :class:`PluginWarning` and remembered; the others keep working.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

import importlib_metadata

from .errors import ConfigError, PluginError, UnknownNameError

__all__ = [
    "ENERGY",
    "MAPPERS",
    "REGISTRIES",
    "SAMPLERS",
    "STRATEGIES",
    "TRANSFORMS",
    "PluginWarning",
    "Registry",
]

T = TypeVar("T")
EntryPoints = Callable[[str], Iterable[Any]]


class PluginWarning(UserWarning):
    """An entry-point plugin could not be loaded; it is skipped and the rest keep working."""


def _entry_points(group: str) -> Iterable[Any]:
    return importlib_metadata.entry_points(group=group)


class Registry(Generic[T]):
    """A registry of named components for one entry-point ``group``.

    Args:
        group: entry-point group, e.g. ``"guidekit.strategies"``.
        kind: what the entries are, for messages (``"strategy"``).
        builtins: modules imported on first use that register the built-in entries.
        entry_points: ``group -> iterable of entry points``; injectable for tests.
    """

    def __init__(
        self,
        group: str,
        kind: str,
        builtins: tuple[str, ...] = (),
        entry_points: EntryPoints = _entry_points,
    ) -> None:
        self.group = group
        self.kind = kind
        self._builtins = builtins
        self._entry_points = entry_points
        self._items: dict[str, T] = {}
        self._origin: dict[str, str] = {}
        self._builtins_loaded = not builtins
        self._plugins_scanned = False
        self.broken: dict[str, str] = {}
        """Entry-point name -> why it failed to load."""

    # -- registration ------------------------------------------------------------------------------
    def register(self, name: str, obj: T | None = None, *, override: bool = False, origin: str = "code"):
        """Register ``obj`` under ``name``; without ``obj`` return a decorator.

        Raises :class:`ConfigError` if ``name`` is taken (unless ``override=True``).
        """

        def add(item: T) -> T:
            if not isinstance(name, str) or not name:
                raise ConfigError(f"name: expected a non-empty string, got {name!r}")
            if name in self._items and not override and self._items[name] is not item:
                raise ConfigError(
                    f"{self.kind} name {name!r} is already registered (by {self._origin[name]}); "
                    "pass override=True to replace it"
                )
            self._items[name] = item
            self._origin[name] = origin
            if isinstance(item, type):
                # the name a class is built from; read back by to_spec()
                item.registry_name = name  # type: ignore[attr-defined]
            return item

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests and interactive use)."""
        self._items.pop(name, None)
        self._origin.pop(name, None)

    # -- lookup ------------------------------------------------------------------------------------
    def _load_builtins(self) -> None:
        if not self._builtins_loaded:
            self._builtins_loaded = True
            for module in self._builtins:
                importlib.import_module(module)

    def _load_entry_point(self, ep: Any) -> None:
        try:
            obj = ep.load()
        except Exception as exc:  # a plugin may fail in any way; report it by name and go on
            why = f"{type(exc).__name__}: {exc}"
            self.broken[ep.name] = why
            warnings.warn(
                f"guidekit plugin {ep.name!r} ({ep.value}) in group {self.group!r} failed to load and is "
                f"skipped: {why}",
                PluginWarning,
                stacklevel=3,
            )
            return
        if ep.name in self._items and self._items[ep.name] is not obj:
            why = f"name clashes with the {self.kind} registered by {self._origin[ep.name]}"
            self.broken[ep.name] = why
            warnings.warn(f"guidekit plugin {ep.name!r} ({ep.value}) skipped: {why}", PluginWarning, stacklevel=3)
            return
        self.register(ep.name, obj, origin=f"plugin {ep.value}")

    def _scan_plugins(self, only: str | None = None) -> None:
        if self._plugins_scanned:
            return
        for ep in self._entry_points(self.group):
            if only is not None and ep.name != only:
                continue
            if ep.name in self.broken or self._origin.get(ep.name) == f"plugin {ep.value}":
                continue
            self._load_entry_point(ep)
        if only is None:
            self._plugins_scanned = True

    def get(self, name: str) -> T:
        """The component registered as ``name``, loading built-ins and then plugins on a miss."""
        self._load_builtins()
        if name not in self._items:
            self._scan_plugins(only=name)
        if name in self._items:
            return self._items[name]
        if name in self.broken:
            raise PluginError(f"{self.kind} {name!r} comes from a plugin that failed to load: {self.broken[name]}")
        known = self.names()
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(f"unknown {self.kind} {name!r}{hint} Known {self.kind} names: {', '.join(known)}")

    def names(self, pattern: str | None = None) -> list[str]:
        """Sorted registered names (built-ins and every loadable plugin), optionally glob-filtered."""
        self._load_builtins()
        self._scan_plugins()
        names = sorted(self._items)
        return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names

    def origin(self, name: str) -> str:
        """Where ``name`` came from: ``"code"`` or ``"plugin <module:attr>"``."""
        self.get(name)
        return self._origin[name]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self.get(name)
        except (UnknownNameError, PluginError):
            return False
        return True

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry(group={self.group!r}, loaded={sorted(self._items)})"


STRATEGIES: Registry[Any] = Registry("guidekit.strategies", "strategy", builtins=("guidekit.strategies",))
ENERGY: Registry[Any] = Registry("guidekit.energy", "energy estimator", builtins=("guidekit.energy",))
TRANSFORMS: Registry[Any] = Registry("guidekit.transforms", "energy transform", builtins=("guidekit.energy",))
MAPPERS: Registry[Any] = Registry("guidekit.mappers", "scale mapper", builtins=("guidekit.energy",))
SAMPLERS: Registry[Any] = Registry("guidekit.samplers", "sampler", builtins=("guidekit.samplers",))

REGISTRIES: dict[str, Registry[Any]] = {
    "strategies": STRATEGIES,
    "energy": ENERGY,
    "transforms": TRANSFORMS,
    "mappers": MAPPERS,
    "samplers": SAMPLERS,
}
