"""Default strength sweeps of every registered strategy on the embedded digits model (``guidekit demo``).

Each built-in has a hand-set sweep whose strengths span "barely guided" to "over-guided" on this model;
any other registered strategy (plugins included) gets a generic one when it can be built from a single
strength: a ``scale`` field takes the strength, a field holding an inner strategy takes ``CFG(strength)``.
Strategies that cannot be built that way are skipped, with the reason.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..component import component_fields
from ..registry import STRATEGIES
from ..strategies.base import GuidanceStrategy

__all__ = ["DEFAULT_STRENGTHS", "Sweep", "default_sweeps", "label"]

DEFAULT_STRENGTHS: tuple[float, ...] = (1.5, 3.0)
"""Strengths of the generic sweep: a mild and a strong CFG-like scale on the digits model."""

APG_NORM_THRESHOLD = 2.5
"""APG's ``r`` for 8x8 digits: about the median per-sample ``|Δx0|`` at mid noise (measured), so only the
largest updates are capped. The paper's SDXL value 15 is for 128x128x4 latents."""


@dataclass(frozen=True)
class Sweep:
    """A strategy family swept over one strength: ``make(strength)`` builds the strategy."""

    name: str
    param: str
    strengths: tuple[float, ...]
    make: Callable[[float], GuidanceStrategy]

    def strategies(self) -> list[tuple[str, GuidanceStrategy]]:
        """``(label, strategy)`` for every strength."""
        return [(f"{self.name} {self.param}={s:g}", self.make(s)) for s in self.strengths]


def _get(name: str) -> type:
    return STRATEGIES.get(name)


def _known() -> dict[str, Sweep]:
    from ..strategies import APG, CFG, SAMG, Interval

    sweeps = [
        Sweep("cfg", "scale", (1.0, 1.5, 2.0, 3.0), lambda s: CFG(s)),
        Sweep("apg", "scale", (2.0, 3.0, 5.0), lambda s: APG(s, 0.0, APG_NORM_THRESHOLD, -0.5)),
        Sweep("interval", "scale", (2.0, 3.0, 5.0), lambda s: Interval(CFG(s))),
        Sweep("samg", "w", (1.5, 2.0, 3.0), lambda s: SAMG(w=s)),
        # λ acts like w ≈ λ σ / (σ - σ') per step, about 3λ on a 12-step trailing grid
        Sweep("cfg++", "λ", (0.4, 0.8), lambda s: _get("cfg++")(scale=s)),
        # the digits model predicts eps: CFG-Zero*'s zero-init step applies to flow velocities only
        Sweep("cfg-zero-star", "scale", DEFAULT_STRENGTHS, lambda s: _get("cfg-zero-star")(scale=s, zero_init_steps=0)),
        Sweep("fdg", "scale", DEFAULT_STRENGTHS, lambda s: _get("fdg")(scales=(4 * s / 3, 2 * s / 3))),
        # the shipped ω of the digits model as trained, and twice as strong along the same (c, s, t) profile
        Sweep("learned-weight", "omega_scale", (1.0, 2.0), lambda s: _get("learned-weight")(omega_scale=s)),
    ]
    return {s.name: s for s in sweeps}


def _generic(name: str, cls: type) -> Sweep | str:
    """A sweep for a strategy with a ``scale`` field or an inner strategy, else why not."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return "not a dataclass: its parameters are unknown"
    from ..strategies import CFG

    fields = component_fields(cls)
    inner = [f.name for f, tp in fields if _is_strategy_type(tp)]
    has_scale = any(f.name == "scale" for f, _ in fields)
    required = [
        f.name
        for f, _ in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in inner
    ]
    if required and not (has_scale and required == ["scale"]):
        return f"needs {', '.join(required)}, which the demo cannot choose"
    if any(f.name == "loss" and f.default is None for f, _ in fields):  # loss guidance (DPS): data, not a knob
        return "needs a loss on x0 (guidekit.losses: a measurement or a classifier), which the demo cannot choose"
    if cls().perturbations():
        return "perturbs attention layers, which the digits model (a UNet without attention) lacks: use --model glyphs"
    if cls().observers():
        return "reads attention maps, which the digits model (a UNet without attention) lacks: use --model glyphs"
    if has_scale and not inner:
        return Sweep(name, "scale", DEFAULT_STRENGTHS, lambda s: cls(scale=s))
    if inner:
        return Sweep(name, "scale", DEFAULT_STRENGTHS, lambda s: cls(**{inner[0]: CFG(s)}))
    return "has neither a scale nor an inner strategy to sweep"


def _is_strategy_type(tp: object) -> bool:
    args = typing.get_args(tp) or (tp,)
    return any(isinstance(a, type) and issubclass(a, GuidanceStrategy) for a in args)


def default_sweeps(names: Sequence[str] | None = None) -> tuple[list[Sweep], dict[str, str]]:
    """Sweeps of ``names`` (default: every registered strategy, built-ins first) and ``{name: why skipped}``."""
    known = _known()
    order = list(names) if names is not None else [*known, *(n for n in STRATEGIES.names() if n not in known)]
    sweeps: list[Sweep] = []
    skipped: dict[str, str] = {}
    for name in order:
        if name in known:
            sweeps.append(known[name])
            continue
        found = _generic(name, STRATEGIES.get(name))
        if isinstance(found, str):
            skipped[name] = found
        else:
            sweeps.append(found)
    return sweeps, skipped


def label(strategy: GuidanceStrategy) -> str:
    """A short readable label: the registry name and only the params needed to rebuild the strategy.

    ``"apg scale=3 norm_threshold=2.5"``; nested components in brackets, ``"interval inner=cfg(scale=3)"``;
    parameters derived from others (SAMG's default mapper from ``w_min``/``w_max``) are left out.
    """
    from ..config import build, to_spec

    try:
        spec = to_spec(strategy).model_dump()
    except Exception:  # a plugin factory without a spec
        return type(strategy).__name__
    params = dict(spec["params"])
    for key in list(params):
        trial = {k: v for k, v in params.items() if k != key}
        try:
            if build({"name": spec["name"], "params": trial}) == strategy:
                params = trial
        except Exception:  # the param is needed
            continue
    return " ".join([spec["name"], *(f"{k}={_short(v)}" for k, v in params.items())])


def _short(value: object) -> str:
    if isinstance(value, dict) and "name" in value:
        inner = " ".join(f"{k}={_short(v)}" for k, v in value.get("params", {}).items() if v is not None)
        return f"{value['name']}({inner})" if inner else str(value["name"])
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:g}"
    if isinstance(value, list | tuple):
        return "(" + ",".join(_short(v) for v in value) + ")"
    return str(value)
