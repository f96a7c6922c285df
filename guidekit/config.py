"""Pydantic specs ``{name, params}`` for every registered component, and ``build`` / ``to_spec``.

Each component class is a frozen dataclass; its fields *are* its params. A strict pydantic model per
class is derived from the dataclass fields (cached), so there is one source of truth. Fields typed as a
component (``Interval.inner``, ``SAMG.energy``, ``SAMG.mapper``) take nested specs. ``ComponentSpec`` and
``to_spec`` (the object -> spec direction) live in :mod:`guidekit.component` and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from .component import Component, ComponentSpec, component_fields, to_spec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
from .errors import ConfigError

__all__ = ["ComponentSpec", "build", "load_spec", "params_model", "to_spec"]


SpecLike = ComponentSpec | dict[str, Any] | str


def _component_base(tp: Any) -> tuple[type[Component] | None, bool]:
    """``(component base, is_tuple)`` for a field annotation, or ``(None, False)``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _component_base(args[0])
        return None, False
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            base, _ = _component_base(args[0])
            return base, base is not None
        return None, False
    if isinstance(tp, type) and issubclass(tp, Component):
        return tp, False
    return None, False


@cache
def params_model(cls: type) -> type[BaseModel]:
    """The strict pydantic model of ``cls``'s params, derived from its dataclass fields."""
    if not dataclasses.is_dataclass(cls):
        raise ConfigError(f"{cls.__name__}: expected a dataclass component to derive params from")
    fields: dict[str, Any] = {}
    for f, tp in component_fields(cls):
        base, is_tuple = _component_base(tp)
        if base is not None:
            spec_tp: Any = tuple[ComponentSpec, ...] if is_tuple else ComponentSpec
            optional = type(None) in typing.get_args(tp)
            tp = spec_tp | None if optional else spec_tp
        if f.default is not dataclasses.MISSING:
            default = f.default
            if isinstance(default, Component):
                default = to_spec(default)
            fields[f.name] = (tp, default)
        elif f.default_factory is not dataclasses.MISSING:
            factory = f.default_factory
            fields[f.name] = (tp, _spec_default(factory()))
        else:
            fields[f.name] = (tp, ...)
    config = ConfigDict(extra="forbid", strict=True, arbitrary_types_allowed=True)
    return create_model(f"{cls.__name__}Params", __config__=config, **fields)


def _spec_default(value: Any) -> Any:
    if isinstance(value, Component):
        return to_spec(value)
    if isinstance(value, tuple) and value and all(isinstance(v, Component) for v in value):
        return tuple(to_spec(v) for v in value)
    return value


def _as_spec(spec: SpecLike, where: str) -> ComponentSpec:
    if isinstance(spec, ComponentSpec):
        return spec
    if isinstance(spec, str):
        return ComponentSpec(name=spec)
    if isinstance(spec, dict):
        try:
            return ComponentSpec.model_validate(spec)
        except ValidationError as exc:
            raise ConfigError(_format_errors(where, exc)) from None
    raise ConfigError(f"{where}: expected a spec {{'name': ..., 'params': {{...}}}} or a name, got {spec!r}")


def _format_errors(where: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        got = err.get("input", None)
        lines.append(f"{where}.{loc}: {err['msg']} (got {got!r})" if loc else f"{where}: {err['msg']}")
    return "invalid config: " + "; ".join(lines)


def build(spec: SpecLike, registry: Any = None, *, where: str = "spec") -> Any:
    """Build a component from ``spec`` (a :class:`ComponentSpec`, a dict, a JSON string or a bare name).

    ``registry`` defaults to the strategies registry. Nested component params are built from nested
    specs with the registry of their declared type. Errors name the offending field.
    """
    from .registry import STRATEGIES

    registry = STRATEGIES if registry is None else registry
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: expected valid JSON, got a parse error: {exc}") from None
    spec = _as_spec(spec, where)
    cls = registry.get(spec.name)
    where = f"{where}[{spec.name}]"
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        # a plugin may register a plain factory: call it with the params as given
        return cls(**spec.params)
    model = params_model(cls)
    try:
        params = model.model_validate_json(json.dumps(spec.params))
    except ValidationError as exc:
        raise ConfigError(_format_errors(where, exc)) from None
    except TypeError as exc:  # params not JSON-serialisable
        raise ConfigError(f"{where}.params: expected JSON values, got {spec.params!r} ({exc})") from None
    kwargs: dict[str, Any] = {}
    for f, tp in component_fields(cls):
        value = getattr(params, f.name)
        base, is_tuple = _component_base(tp)
        if base is not None and value is not None:
            sub = f"{where}.{f.name}"
            if is_tuple:
                value = tuple(build(v, base.registry, where=f"{sub}[{i}]") for i, v in enumerate(value))
            else:
                value = build(value, base.registry, where=sub)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_spec(path: str | Path) -> ComponentSpec:
    """Read a spec from a ``.json`` or ``.toml`` file, with errors that name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"spec file: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise ConfigError(f"spec file {str(path)!r}: expected valid {kind}, got a parse error: {exc}") from None
    return _as_spec(data, f"spec file {str(path)!r}")
