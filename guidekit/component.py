"""Base class of everything built from a config spec, the spec itself, and :func:`to_spec`.

This module is the object -> spec direction; :mod:`guidekit.config` builds the other way and imports
it (never the reverse, so that the two modules do not import each other).
"""

from __future__ import annotations

import dataclasses
import sys
from functools import cache
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from .errors import ConfigError

if TYPE_CHECKING:
    from .registry import Registry

__all__ = ["Component", "ComponentSpec", "component_fields", "to_spec"]


class ComponentSpec(BaseModel):
    """``{"name": ..., "params": {...}}``: a registered component and its constructor arguments."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    params: dict[str, Any] = {}


class Component:
    """A small immutable object (a frozen dataclass in every built-in) with a registry name.

    Subclass bases set ``registry``; :meth:`guidekit.registry.Registry.register` sets ``registry_name``
    on the concrete class (a subclass does not inherit it for :func:`to_spec`: it needs its own name).
    :func:`guidekit.to_spec` reads the dataclass fields back as params.
    """

    registry: ClassVar[Registry[Any]]
    registry_name: ClassVar[str]

    def to_spec(self) -> ComponentSpec:
        """This object as a JSON-serialisable :class:`ComponentSpec`."""
        return to_spec(self)


def _field_type(cls: type, f: dataclasses.Field[Any]) -> Any:
    """Resolve one field's annotation in the module of the class that declared it."""
    if not isinstance(f.type, str):
        return f.type
    owner = next(k for k in cls.__mro__ if f.name in vars(k).get("__annotations__", {}))
    return eval(f.type, dict(vars(sys.modules[owner.__module__])))


@cache
def component_fields(cls: type) -> tuple[tuple[dataclasses.Field[Any], Any], ...]:
    """``(field, resolved type)`` of each init field of a component dataclass: its parameters, as specs,
    pydantic params models and generated UIs (the ComfyUI nodes) read them."""
    return tuple((f, _field_type(cls, f)) for f in dataclasses.fields(cls) if f.init)


def _plain(value: Any) -> Any:
    if isinstance(value, Component):
        return to_spec(value).model_dump()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _registered_name(cls: type) -> str:
    """The name ``cls`` itself is registered under; :class:`ConfigError` for an unregistered class."""
    name = vars(cls).get("registry_name")  # never inherited: a subclass would rebuild as its base
    if name is not None and dataclasses.is_dataclass(cls):
        return name
    expected = "obj: expected a registered dataclass component"
    base = next((k for k in cls.__mro__[1:] if "registry_name" in vars(k)), None)
    if name is None and base is not None:
        raise ConfigError(
            f"{expected}, got {cls.__name__}, an unregistered subclass of {base.__name__} "
            f"(registered as {vars(base)['registry_name']!r}) whose spec would rebuild as {base.__name__}; "
            f"register it under a name of its own (@STRATEGIES.register(name) or similar)"
        )
    raise ConfigError(f"{expected}, got {cls.__name__} (register it with @STRATEGIES.register(name) or similar)")


def to_spec(obj: Any) -> ComponentSpec:
    """The spec that :func:`guidekit.build` turns back into an equal object (``build(to_spec(x)) == x``).

    Raises :class:`ConfigError` for an object whose own class is not registered (an unregistered
    subclass of a registered class included) or was unregistered since.
    """
    name = _registered_name(type(obj))
    params = {f.name: _plain(getattr(obj, f.name)) for f, _ in component_fields(type(obj))}
    return ComponentSpec(name=name, params=params)
