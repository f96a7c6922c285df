"""ComfyUI node classes generated from guidekit's strategy registry, plus the guider and window nodes.

One node per registered strategy (entry-point plugins included): its widgets come from the strategy's
pydantic params model (:func:`guidekit.config.params_model`: types, defaults, ranges where the field declares
them) and its tooltips from the class docstring's ``Args:``. Fields that hold a strategy (``inner`` of
Interval, Rescale, the schedules) become ``GUIDEKIT_STRATEGY`` inputs, so those nodes are the combinators.
Optional numbers, tuples and nested non-strategy components (SAMG's energy) are text widgets: empty means
the default ``None``, tuples are comma-separated, components are JSON specs.

:func:`node_mappings` builds the mappings from the registry as it is now; the package's
``NODE_CLASS_MAPPINGS`` is that, taken when ComfyUI imports the pack. Building a node's strategy never
imports ComfyUI; only the guider does.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import types
import typing
from typing import Any, ClassVar, Literal, Union

import annotated_types
from torch import Tensor

from guidekit.component import component_fields
from guidekit.config import build, params_model, to_spec
from guidekit.errors import ConfigError, GuidekitError
from guidekit.registry import STRATEGIES
from guidekit.strategies.base import Combinator, GuidanceStrategy
from guidekit.strategies.interval import Interval

from .strategy import NodeInputError, StrategyRef, as_ref

__all__ = [
    "STRATEGY_TYPE",
    "GuidekitGuiderNode",
    "GuidekitModelPatchNode",
    "IntervalPercentNode",
    "node_mappings",
    "strategy_node",
]

STRATEGY_TYPE = "GUIDEKIT_STRATEGY"
"""The ComfyUI wire type of a guidekit strategy (namespaced: other packs' ``STRATEGY`` types do not connect)."""

CATEGORY = "sampling/guidekit"
_NUMBER_LIMIT = 1.0e4
"""Widget bounds for a number whose field declares none (the strategy's own checks still apply)."""


# -- reading the spec ----------------------------------------------------------------------------------
def _docstring_args(cls: type) -> dict[str, str]:
    """``{field: text}`` from the ``Args:`` section of ``cls``'s docstring (``a, b: text`` lines included)."""
    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    in_args, current = False, None
    for line in doc.splitlines():
        if line.strip() == "Args:":
            in_args = True
            continue
        if not in_args:
            continue
        if line and not line.startswith(" "):
            break
        match = re.match(r"^ {4}([\w, ]+):\s*(.*)$", line)
        if match:
            names = [n.strip() for n in match.group(1).split(",")]
            current = names
            for n in names:
                out[n] = match.group(2).strip()
        elif current and line.strip():
            for n in current:
                out[n] += " " + line.strip()
    return out


def _summary(cls: type) -> str:
    doc = inspect.getdoc(cls) or cls.__name__
    return doc.split("\n\n", 1)[0].replace("\n", " ")


def _strip_none(tp: Any) -> tuple[Any, bool]:
    """``(tp without None, whether None was allowed)``."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else Union[tuple(args)]), optional  # noqa: UP007
    return tp, False


def _is_strategy_type(tp: Any) -> bool:
    tp, _ = _strip_none(tp)
    return isinstance(tp, type) and issubclass(tp, GuidanceStrategy)


def _bounds(metadata: list[Any]) -> dict[str, float]:
    """``min``/``max`` from a field's pydantic constraints (``Field(ge=..., le=...)``, ``Annotated``)."""
    out: dict[str, float] = {}
    for m in metadata:
        for attr, key in (("ge", "min"), ("gt", "min"), ("le", "max"), ("lt", "max")):
            value = getattr(m, attr, None)
            if isinstance(m, annotated_types.BaseMetadata) and value is not None:
                out[key] = float(value)
    return out


@dataclasses.dataclass(frozen=True)
class _Field:
    """One widget or input of a generated node, and how its value goes back into the spec."""

    name: str
    kind: Literal["strategy", "float", "int", "bool", "choice", "str", "optional_float", "floats", "json"]
    spec: tuple[Any, ...]
    required: bool


def _field(name: str, hint: Any, annotation: Any, default: Any, metadata: list[Any], tooltip: str) -> _Field:
    has_default = default is not dataclasses.MISSING and default is not ... and repr(default) != "PydanticUndefined"
    opts: dict[str, Any] = {"tooltip": tooltip} if tooltip else {}
    if _is_strategy_type(hint):
        return _Field(name, "strategy", (STRATEGY_TYPE, opts), required=not _strip_none(hint)[1])
    base, optional = _strip_none(annotation)
    if typing.get_origin(base) is Literal:
        choices = list(typing.get_args(base))
        return _Field(name, "choice", (choices, {**opts, "default": default if has_default else choices[0]}), True)
    if base is bool and not optional:
        return _Field(name, "bool", ("BOOLEAN", {**opts, "default": bool(default) if has_default else False}), True)
    if base is int and not optional:
        lo, hi = _bounds(metadata).get("min", -_NUMBER_LIMIT), _bounds(metadata).get("max", _NUMBER_LIMIT)
        d = default if has_default else 0
        return _Field(
            name, "int", ("INT", {**opts, "default": d, "min": int(min(lo, d)), "max": int(max(hi, d))}), True
        )
    if base is float and not optional:
        bounds = _bounds(metadata)
        d = float(default) if has_default else 0.0
        lo, hi = min(bounds.get("min", -_NUMBER_LIMIT), d), max(bounds.get("max", _NUMBER_LIMIT), d)
        return _Field(name, "float", ("FLOAT", {**opts, "default": d, "min": lo, "max": hi, "step": 0.01}), True)
    text = f"{tooltip} " if tooltip else ""
    if base is str and not optional:
        return _Field(name, "str", ("STRING", {**opts, "default": default if has_default else ""}), True)
    if base is float:
        shown = "" if default is None else repr(float(default))
        return _Field(name, "optional_float", ("STRING", {"default": shown, "tooltip": text + "(empty: None)"}), True)
    if typing.get_origin(base) is tuple and typing.get_args(base)[:1] == (float,):
        shown = "" if default in (None, ...) or not has_default else ", ".join(repr(float(v)) for v in default)
        return _Field(name, "floats", ("STRING", {"default": shown, "tooltip": text + "(comma-separated)"}), True)
    shown = "" if not has_default or default is None else json.dumps(_jsonable(default))
    return _Field(name, "json", ("STRING", {"default": shown, "tooltip": text + "(a JSON spec; empty: None)"}), True)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def _fields_of(cls: type) -> list[_Field]:
    model = params_model(cls)
    hints = {f.name: tp for f, tp in component_fields(cls)}
    docs = _docstring_args(cls)
    return [
        _field(name, hints.get(name), info.annotation, info.default, list(info.metadata), docs.get(name, ""))
        for name, info in model.model_fields.items()
    ]


def _parse(field: _Field, value: Any, node: str) -> Any:
    """A widget value back as the spec's param."""
    where = f"{field.name}: expected"
    if field.kind == "optional_float":
        text = str(value).strip()
        if text.lower() in ("", "none"):
            return None
        try:
            number = float(text)
        except ValueError:
            raise NodeInputError(node, f"{where} a number or empty (None), got {value!r}") from None
        if not math.isfinite(number):
            raise NodeInputError(node, f"{where} a finite number or empty (None), got {value!r}")
        return number
    if field.kind == "floats":
        text = str(value).strip()
        if not text:
            return None
        try:
            return [float(v) for v in text.split(",")]
        except ValueError:
            raise NodeInputError(node, f"{where} comma-separated numbers, got {value!r}") from None
    if field.kind == "json":
        text = str(value).strip()
        if not text:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise NodeInputError(node, f"{where} a JSON spec or empty (None), got a parse error: {exc}") from None
    if field.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# -- the generated strategy nodes --------------------------------------------------------------------
def _display(name: str, cls: type) -> str:
    return f"Guidekit {cls.__name__} ({name})"


def strategy_node(name: str) -> type:
    """The ComfyUI node class of the registered strategy ``name`` (a plugin's included)."""
    cls = STRATEGIES.get(name)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ConfigError(f"{name}: expected a registered dataclass strategy to derive a node from, got {cls!r}")
    fields = _fields_of(cls)
    display = _display(name, cls)
    combinator = issubclass(cls, Combinator) or any(f.kind == "strategy" for f in fields)

    def input_types(node_cls: type) -> dict[str, dict[str, tuple[Any, ...]]]:
        required = {f.name: f.spec for f in fields if f.required}
        optional = {f.name: f.spec for f in fields if not f.required}
        return {"required": required, "optional": optional} if optional else {"required": required}

    def make(self: Any, **kwargs: Any) -> tuple[StrategyRef]:
        unknown = sorted(set(kwargs) - {f.name for f in fields})
        if unknown:
            raise NodeInputError(display, f"{unknown[0]}: expected one of {[f.name for f in fields]}, got an input")
        inners = {
            f.name: as_ref(kwargs[f.name], display, f.name) for f in fields if f.kind == "strategy" and f.name in kwargs
        }
        plain = {
            f.name: _parse(f, kwargs[f.name], display) for f in fields if f.kind != "strategy" and f.name in kwargs
        }

        def resolve(sigmas: Tensor | None) -> GuidanceStrategy:
            params = dict(plain)
            for key, ref in inners.items():
                params[key] = to_spec(ref.resolve(sigmas)).model_dump(mode="json")
            return _build(display, name, params)

        ref = StrategyRef(display, resolve, any(r.needs_schedule for r in inners.values()))
        if not ref.needs_schedule:
            strategy = ref.resolve(None)  # checked here: the error names this node, not the sampler
            ref = StrategyRef(display, lambda sigmas: strategy)
        return (ref,)

    attrs: dict[str, Any] = {
        "INPUT_TYPES": classmethod(input_types),
        "RETURN_TYPES": (STRATEGY_TYPE,),
        "RETURN_NAMES": ("strategy",),
        "FUNCTION": "make",
        "CATEGORY": f"{CATEGORY}/{'combinators' if combinator else 'strategies'}",
        "DESCRIPTION": _summary(cls),
        "GUIDEKIT_NAME": name,
        "make": make,
    }
    return type(f"GuidekitStrategy_{cls.__name__}", (), attrs)


def _build(display: str, name: str, params: dict[str, Any]) -> GuidanceStrategy:
    try:
        return build({"name": name, "params": params}, where="inputs")
    except (ConfigError, GuidekitError) as exc:
        raise NodeInputError(display, str(exc)) from None


# -- fixed nodes ---------------------------------------------------------------------------------------
class IntervalPercentNode:
    """Guide only the steps ``int(start·N) <= i < int(end·N)`` of the sampler's schedule (N steps).

    The window becomes an :class:`~guidekit.Interval` in sigma when sampling starts
    (:meth:`Interval.from_fractions` on the sigmas the sampler gets), so the same steps are guided in
    float32 and float64 and Heun's corrector follows its step. Outside it, the unconditional forward is
    skipped (one NFE per step).
    """

    DISPLAY: ClassVar[str] = "Guidekit Interval (percent of steps)"
    RETURN_TYPES = (STRATEGY_TYPE,)
    RETURN_NAMES = ("strategy",)
    FUNCTION = "make"
    CATEGORY = f"{CATEGORY}/combinators"
    DESCRIPTION = "Apply the strategy only on a window of the steps, given as fractions of the step count."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, tuple[Any, ...]]]:
        frac = {"min": 0.0, "max": 1.0, "step": 0.01}
        return {
            "required": {
                "strategy": (STRATEGY_TYPE, {"tooltip": "the strategy applied inside the window"}),
                "start_percent": ("FLOAT", {**frac, "default": 0.0, "tooltip": "first guided step, fraction of N"}),
                "end_percent": ("FLOAT", {**frac, "default": 1.0, "tooltip": "end of the window (excluded)"}),
            }
        }

    def make(self, strategy: Any, start_percent: float, end_percent: float) -> tuple[StrategyRef]:
        inner = as_ref(strategy, self.DISPLAY, "strategy")
        for field, value in (("start_percent", start_percent), ("end_percent", end_percent)):
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise NodeInputError(self.DISPLAY, f"{field}: expected a fraction in [0, 1], got {value!r}")
        if end_percent < start_percent:
            raise NodeInputError(
                self.DISPLAY, f"end_percent: expected >= start_percent ({start_percent}), got {end_percent}"
            )
        if not inner.needs_schedule:
            inner.resolve(None)

        def resolve(sigmas: Tensor | None) -> GuidanceStrategy:
            if sigmas is None:
                raise GuidekitError(f"{self.DISPLAY}: expected the sampler's sigmas, got None")
            return Interval.from_fractions(inner.resolve(sigmas), float(start_percent), float(end_percent), sigmas)

        return (StrategyRef(self.DISPLAY, resolve, needs_schedule=True),)


class GuidekitGuiderNode:
    """A GUIDER for ``SamplerCustomAdvanced`` that guides with a guidekit strategy through guidekit's engine."""

    DISPLAY: ClassVar[str] = "Guidekit Guider"
    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Per model evaluation, runs only the branches the strategy's plan needs (cond, or cond and uncond) "
        "and combines them with guidekit; the strategy's state advances once per sampler step."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, tuple[Any, ...]]]:
        return {
            "required": {
                "model": ("MODEL",),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "strategy": (STRATEGY_TYPE,),
            },
            "optional": {"weak_model": ("MODEL", {"tooltip": "AutoGuidance's weak model (same family)"})},
        }

    def get_guider(self, model: Any, positive: Any, negative: Any, strategy: Any, weak_model: Any = None) -> tuple[Any]:
        from .guider import GuidekitComfyGuider  # imports ComfyUI

        guider = GuidekitComfyGuider(model, as_ref(strategy, self.DISPLAY, "strategy"), weak_model)
        guider.set_conds(positive, negative)
        return (guider,)


class GuidekitModelPatchNode:
    """Installs a guidekit strategy on a MODEL for plain KSampler users (ComfyUI's own sampling function)."""

    DISPLAY: ClassVar[str] = "Guidekit Model Patch"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "For KSampler: runs only the conditionings the strategy's plan needs (chaining another node's "
        "calc-cond-batch function), combines with guidekit in the cfg-function slot (refused if another node "
        "holds it), keeps other nodes' pre- and post-cfg functions; the KSampler's cfg is not used."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, tuple[Any, ...]]]:
        return {"required": {"model": ("MODEL",), "strategy": (STRATEGY_TYPE,)}}

    def patch(self, model: Any, strategy: Any) -> tuple[Any]:
        from .patch import GuidekitModelPatch  # imports ComfyUI

        try:
            return (GuidekitModelPatch(as_ref(strategy, self.DISPLAY, "strategy")).apply(model),)
        except ConfigError as exc:
            raise NodeInputError(self.DISPLAY, str(exc)) from None


def node_mappings() -> tuple[dict[str, type], dict[str, str]]:
    """``(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)`` from the registry as it is now."""
    fixed: dict[str, Any] = {
        "GuidekitGuider": GuidekitGuiderNode,
        "GuidekitModelPatch": GuidekitModelPatchNode,
        "GuidekitIntervalPercent": IntervalPercentNode,
    }
    classes: dict[str, type] = dict(fixed)
    names = {key: node.DISPLAY for key, node in fixed.items()}
    for name in STRATEGIES.names():
        cls = STRATEGIES.get(name)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            continue  # a plugin's plain factory has no params model to derive widgets from
        key = f"Guidekit_{name}"
        classes[key] = strategy_node(name)
        names[key] = _display(name, cls)
    return classes, names
