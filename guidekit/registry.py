"""Name -> component registries, one per group, with lazy entry-point plugins.

Built-ins register in code (``@STRATEGIES.register("cfg")``). Third parties declare, in their
``pyproject.toml``::

    [project.entry-points."guidekit.strategies"]
    my-strategy = "my_package.module:MyStrategy"

Entry points are read on the first miss (or by :meth:`Registry.names`), never at import. A plugin that
fails to load, even with ``SystemExit``, is reported by name in a :class:`PluginWarning` and remembered;
the others keep working. A misspelled name is answered from the entry points' *names*: no plugin is
imported to suggest one.

**One canonical name per object.** The first name an object is registered under is its canonical name
(``registry_name`` on a class, what :func:`guidekit.to_spec` writes). Registering it again under another
name adds an *alias*: the alias builds the same object, and saved specs keep the canonical name.
:meth:`Registry.unregister` of a canonical name removes the object with its aliases; specs that name it
then fail with an error saying it was unregistered.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

import importlib_metadata

from .errors import ConfigError, PluginError, UnknownNameError

__all__ = [
    "ENERGY",
    "MAPPERS",
    "REGISTRIES",
    "SAMPLERS",
    "SCALE_FUNCTIONS",
    "STRATEGIES",
    "TRANSFORMS",
    "PluginWarning",
    "Registry",
]

T = TypeVar("T")
EntryPoints = Callable[[str], Iterable[Any]]
Accepts = Callable[["Registry[Any]", Any], bool]


class PluginWarning(UserWarning):
    """An entry-point plugin could not be loaded; it is skipped and the rest keep working."""


def _entry_points(group: str) -> Iterable[Any]:
    return importlib_metadata.entry_points(group=group)


def component_of_group(registry: Registry[Any], obj: Any) -> bool:
    """A component class whose base declares ``registry`` (``GuidanceStrategy.registry = STRATEGIES``),
    or a factory function (a callable that is not a component)."""
    if isinstance(obj, type):
        return getattr(obj, "registry", None) is registry
    return plain_callable(registry, obj)


def plain_callable(registry: Registry[Any], obj: Any) -> bool:
    """A callable that is not a component class or instance (samplers, scale functions)."""
    return callable(obj) and getattr(obj, "registry", None) is None


def _describe(obj: Any) -> str:
    """``obj`` for a message: ``the strategy class CFG``, ``int 3``."""
    kind = getattr(getattr(obj, "registry", None), "kind", None)
    if isinstance(obj, type):
        return f"the {kind} class {obj.__qualname__}" if kind else f"the class {obj.__qualname__}"
    if kind:
        return f"a {kind} instance {obj!r}"
    return f"{type(obj).__name__} {obj!r}"


class Registry(Generic[T]):
    """A registry of named components for one entry-point ``group``.

    Args:
        group: entry-point group, e.g. ``"guidekit.strategies"``.
        kind: what the entries are, for messages (``"strategy"``).
        builtins: modules imported on first use that register the built-in entries.
        entry_points: ``group -> iterable of entry points``; injectable for tests.
        accepts: ``(registry, obj) -> bool``, what the group takes (every object when ``None``); code
            registering anything else gets a :class:`ConfigError`, a plugin a :class:`PluginWarning`.
        expects: what ``accepts`` takes, for those messages.
    """

    def __init__(
        self,
        group: str,
        kind: str,
        builtins: tuple[str, ...] = (),
        entry_points: EntryPoints = _entry_points,
        *,
        accepts: Accepts | None = None,
        expects: str = "",
    ) -> None:
        self.group = group
        self.kind = kind
        self._builtins = builtins
        self._entry_points = entry_points
        self._accepts = accepts
        self._expects = expects or f"a {kind}"
        self._items: dict[str, T] = {}
        self._origin: dict[str, str] = {}
        self._aliases: dict[str, str] = {}
        """Alias -> canonical name."""
        self._canonical: dict[int, str] = {}
        """``id(obj)`` -> its canonical name (the registry holds ``obj``, so the id stays valid)."""
        self._unregistered: set[str] = set()
        self._builtins_loaded = not builtins
        self._plugins_scanned = False
        self.broken: dict[str, str] = {}
        """Entry-point name -> why it failed to load."""

    # -- registration ------------------------------------------------------------------------------
    def register(self, name: str, obj: T | None = None, *, override: bool = False, origin: str = "code"):
        """Register ``obj`` under ``name``; without ``obj`` return a decorator.

        An object registered already under another name gets ``name`` as an alias: the alias resolves
        to it and its canonical name (the one :func:`guidekit.to_spec` writes) stays. Raises
        :class:`ConfigError` if ``name`` is taken by another object (unless ``override=True``) or if
        the group does not take ``obj``.
        """

        def add(item: T) -> T:
            self._check(name, item)
            current = self._resolve(name)
            if current is not None and self._items[current] is item:
                return item  # the same object again is harmless
            if current is not None:
                if not override:
                    taken = f"an alias of {current!r}" if name in self._aliases else "registered"
                    raise ConfigError(
                        f"{self.kind} name {name!r} is already {taken} (by {self._origin[current]}); "
                        "pass override=True to replace it"
                    )
                self.unregister(name)
            self._unregistered.discard(name)
            canonical = self._canonical.get(id(item))
            if canonical is not None:
                self._aliases[name] = canonical
                return item
            self._items[name] = item
            self._origin[name] = origin
            self._canonical[id(item)] = name
            if isinstance(item, type) and "registry_name" not in vars(item):
                # the name a class is built from; read back by to_spec() (never inherited by subclasses)
                item.registry_name = name  # type: ignore[attr-defined]
            return item

        return add if obj is None else add(obj)

    def _check(self, name: object, item: object) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name: expected a non-empty string, got {name!r}")
        if self._accepts is not None and not self._accepts(self, item):
            raise ConfigError(f"{self.kind} {name!r}: expected {self._expects}, got {_describe(item)}")

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests and interactive use); a canonical name takes its aliases with it."""
        if self._aliases.pop(name, None) is not None or name not in self._items:
            return
        item = self._items.pop(name)
        del self._origin[name], self._canonical[id(item)]
        self._aliases = {a: c for a, c in self._aliases.items() if c != name}
        if isinstance(item, type) and vars(item).get("registry_name") == name:
            del item.registry_name  # type: ignore[attr-defined]
        self._unregistered.add(name)

    def _resolve(self, name: str) -> str | None:
        """The canonical name ``name`` stands for among the loaded entries, or ``None``."""
        if name in self._items:
            return name
        return self._aliases.get(name)

    # -- lookup ------------------------------------------------------------------------------------
    def _load_builtins(self) -> None:
        if not self._builtins_loaded:
            self._builtins_loaded = True
            for module in self._builtins:
                importlib.import_module(module)

    def _skip_plugin(self, ep: Any, why: str) -> None:
        """Remember why the plugin ``ep`` cannot be used and warn, naming it."""
        self.broken[ep.name] = why
        warnings.warn(
            f"guidekit plugin {ep.name!r} ({ep.value}) in group {self.group!r} {why}; it is skipped",
            PluginWarning,
            stacklevel=4,
        )

    def _load_entry_point(self, ep: Any) -> None:
        try:
            obj = ep.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a plugin may fail in any way, SystemExit included: name it, go on
            self._skip_plugin(ep, f"failed to load: {type(exc).__name__}: {exc}")
            return
        current = self._resolve(ep.name)
        if current is not None and self._items[current] is not obj:
            self._skip_plugin(ep, f"clashes with the {self.kind} registered by {self._origin[current]}")
        elif self._accepts is not None and not self._accepts(self, obj):
            self._skip_plugin(ep, f"registers the wrong kind of object: expected {self._expects}, got {_describe(obj)}")
        else:
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
        """The component registered as ``name`` (or an alias), loading built-ins, then that plugin on a miss."""
        self._load_builtins()
        if self._resolve(name) is None:
            self._scan_plugins(only=name)
        canonical = self._resolve(name)
        if canonical is not None:
            return self._items[canonical]
        if name in self.broken:
            raise PluginError(f"{self.kind} {name!r} comes from a plugin that {self.broken[name]}")
        known = self._known_names()
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        gone = " (it was unregistered; register it again to build specs that name it)"
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}{gone if name in self._unregistered else ''}{hint} "
            f"Known {self.kind} names: {', '.join(known)}"
        )

    def _known_names(self) -> list[str]:
        """Loaded names, aliases and the names of entry points not loaded yet: no plugin is imported."""
        declared = {ep.name for ep in self._entry_points(self.group)} - set(self.broken)
        return sorted(set(self._items) | set(self._aliases) | declared)

    def names(self, pattern: str | None = None) -> list[str]:
        """Sorted canonical names (built-ins and every loadable plugin), optionally glob-filtered.

        Aliases are left out, so that each object is listed once (:meth:`aliases` has them).
        """
        self._load_builtins()
        self._scan_plugins()
        names = sorted(self._items)
        return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names

    def aliases(self) -> dict[str, str]:
        """Alias -> the canonical name it resolves to."""
        self._load_builtins()
        self._scan_plugins()
        return dict(sorted(self._aliases.items()))

    def origin(self, name: str) -> str:
        """Where ``name`` came from: ``"code"`` or ``"plugin <module:attr>"`` (an alias: its object's)."""
        self.get(name)
        return self._origin[self._resolve(name) or name]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self.get(name)
        except (UnknownNameError, PluginError):
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry(group={self.group!r}, loaded={sorted(self._items)})"


def _components(group: str, kind: str, builtin: str, base: str) -> Registry[Any]:
    """The registry of a component group: subclasses of ``base`` (or factory functions) only."""
    expects = f"a subclass of {base} or a factory function"
    return Registry(group, kind, (builtin,), accepts=component_of_group, expects=expects)


def _functions(group: str, kind: str, builtin: str, expects: str) -> Registry[Any]:
    """The registry of a function group (samplers, scale functions): plain callables only."""
    return Registry(group, kind, (builtin,), accepts=plain_callable, expects=expects)


STRATEGIES = _components("guidekit.strategies", "strategy", "guidekit.strategies", "gk.GuidanceStrategy")
ENERGY = _components("guidekit.energy", "energy estimator", "guidekit.energy", "guidekit.energy.EnergyEstimator")
TRANSFORMS = _components(
    "guidekit.transforms", "energy transform", "guidekit.energy", "guidekit.energy.EnergyTransform"
)
MAPPERS = _components("guidekit.mappers", "scale mapper", "guidekit.energy", "guidekit.energy.ScaleMapper")
SAMPLERS = _functions(
    "guidekit.samplers", "sampler", "guidekit.samplers", "a sampler function (denoiser, x, sigmas, ...) -> x"
)
SCALE_FUNCTIONS = _functions(
    "guidekit.scale_functions", "scale function", "guidekit.strategies.scale_function", "a function float -> float"
)

REGISTRIES: dict[str, Registry[Any]] = {
    "strategies": STRATEGIES,
    "energy": ENERGY,
    "transforms": TRANSFORMS,
    "mappers": MAPPERS,
    "samplers": SAMPLERS,
    "scale-functions": SCALE_FUNCTIONS,
}
