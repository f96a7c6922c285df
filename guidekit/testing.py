"""The shared strategy contract, and hypothesis generators for guidance tests.

Every registered strategy, plugins included, must pass the same checks (``design.md``, methods.md §11):
shape/dtype/device kept, finite output, batch independence, ``c == u`` gives ``c``, ``__call__`` agrees
with ``step``, state advances once per step, 4D/5D flattening, layout round trip, ``needs_uncond``
honoured, and ``build(to_spec(s)) == s``. Plugin authors run them in their own tests::

    from guidekit.testing import check_strategy
    check_strategy(MyStrategy())          # raises ContractError naming every failed check

    # or one pytest test per check:
    @pytest.mark.parametrize("case", contract_cases([MyStrategy()]), ids=str)
    def test_contract(case):
        case.run()

A strategy that cannot be built with defaults overrides the classmethod
:meth:`GuidanceStrategy.contract_example` to return an instance. A check that does not apply by design is
listed with a reason in the class attribute :attr:`GuidanceStrategy.contract_exempt`, e.g.
``contract_exempt = {"rank_flattening": "smooths over (h, w)"}``.

The hypothesis generators (:func:`layouts`, :func:`shapes`, :func:`pred_pairs`, :func:`sigmas`,
:func:`examples`) need ``hypothesis``; everything else runs without it on fixed, seeded examples.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .branch import Branch, observation_key
from .config import ComponentSpec, build, to_spec
from .context import GuidanceContext
from .engine.backend import Backend
from .ops.checks import all_finite
from .ops.shapes import append_dims, canonical_layout, from_canonical, parse_layout, to_canonical
from .registry import STRATEGIES
from .strategies.base import GuidanceStrategy

__all__ = [
    "CHECKS",
    "DTYPES",
    "KINDS",
    "LAYOUTS",
    "ContractCase",
    "ContractError",
    "Example",
    "check_strategy",
    "contract_cases",
    "example_strategy",
    "examples",
    "fixed_examples",
    "layouts",
    "make_pair",
    "pred_pairs",
    "shapes",
    "sigmas",
]

LAYOUTS: tuple[str, ...] = ("b c h w", "b h w c", "b c f h w", "b f c h w", "b f h w c", "b c l")
"""Native layouts the generators draw: images, channels-last, ModelScope/Wan video, CogVideoX video, 1D."""

KINDS: tuple[str, ...] = (
    "independent",
    "correlated",
    "equal",
    "scaled",
    "tiny_delta",
    "offset",
    "zero_sample",
    "constant_sample",
)
"""Kinds of prediction pairs (:func:`make_pair`), each a case that has broken some guidance code."""

DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.bfloat16)

_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}


class ContractError(AssertionError):
    """A strategy broke the shared contract; the message names the strategy, the check and the input."""


# -- examples ------------------------------------------------------------------------------------------
def make_pair(
    shape: Sequence[int],
    kind: str = "correlated",
    seed: int = 0,
    magnitude: float = 1.0,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """A deterministic ``(pred_cond, pred_uncond)`` pair of ``shape`` (float64 math, then ``dtype``).

    Kinds: ``independent`` (two Gaussians), ``correlated`` (``u = c + 0.3 n``, the usual case), ``equal``
    (``u = c``), ``scaled`` (``u = c / 2``: ``Δ`` parallel to ``c``), ``tiny_delta`` (``u = c + 1e-6 n``),
    ``offset`` (a large common mean), ``zero_sample`` (sample 0 is all zeros in both), ``constant_sample``
    (sample 0 is constant: zero std).
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    gen = torch.Generator().manual_seed(int(seed))
    c = torch.randn(tuple(shape), generator=gen, dtype=torch.float64)
    noise = torch.randn(tuple(shape), generator=gen, dtype=torch.float64)
    if kind == "independent":
        u = noise
    elif kind == "equal":
        u = c.clone()
    elif kind == "scaled":
        u = 0.5 * c
    elif kind == "tiny_delta":
        u = c + 1e-6 * noise
    elif kind == "offset":
        c = c + 3.0
        u = c + 0.3 * noise
    else:
        u = c + 0.3 * noise
    if kind == "zero_sample":
        c[0], u[0] = 0.0, 0.0
    if kind == "constant_sample":
        c[0], u[0] = 2.0, 1.0
    return (magnitude * c).to(dtype=dtype, device=device), (magnitude * u).to(dtype=dtype, device=device)


@dataclass(frozen=True)
class Example:
    """One contract input: canonical ``(b, c, *spatial)`` predictions, per-sample sigma, a native layout.

    ``layout`` is the model-side layout the predictions came from (same rank); checks use it for the
    layout round trip.
    """

    pred_cond: Tensor
    pred_uncond: Tensor
    sigma: Tensor
    layout: str
    kind: str = "correlated"

    def cast(self, dtype: torch.dtype) -> Example:
        return dataclasses.replace(self, pred_cond=self.pred_cond.to(dtype), pred_uncond=self.pred_uncond.to(dtype))

    def context(self, **changes: Any) -> GuidanceContext:
        """A context for one evaluation: this example's sigma, ``x`` and ``sigma_next`` filled in."""
        gen = torch.Generator().manual_seed(1234)
        noise = torch.randn(self.pred_cond.shape, generator=gen, dtype=torch.float64).to(self.pred_cond)
        sigma = self.sigma.to(self.pred_cond.device)
        x = self.pred_cond + append_dims(sigma.to(self.pred_cond.dtype), self.pred_cond.ndim) * noise
        fields: dict[str, Any] = dict(sigma=sigma, step=0, num_steps=10, sigma_next=sigma * 0.5, x=x)
        fields.update(changes)
        return GuidanceContext(**fields)

    def __str__(self) -> str:
        return (
            f"layout={self.layout!r} shape={tuple(self.pred_cond.shape)} dtype={self.pred_cond.dtype} "
            f"kind={self.kind} sigma={[round(float(s), 4) for s in self.sigma]}"
        )


def _example(layout: str, native_shape: Sequence[int], kind: str, seed: int, sigma: Sequence[float]) -> Example:
    axes = parse_layout(layout)
    canon = canonical_layout(layout).split()
    shape = [native_shape[axes.index(a)] for a in canon]
    c, u = make_pair(shape, kind, seed)
    return Example(c, u, torch.tensor(list(sigma), dtype=torch.float32), layout, kind)


def fixed_examples(device: str | torch.device = "cpu") -> list[Example]:
    """A small fixed set of examples covering 3D/4D/5D, every layout family, batch 1-3 and each kind.

    Sigmas fall inside and outside the common guidance intervals, and some batches mix both.
    """
    specs = [
        ("b c h w", (2, 4, 6, 5), "correlated", [1.0, 10.0]),
        ("b c f h w", (3, 2, 4, 5, 6), "independent", [0.1, 2.0, 70.0]),
        ("b f c h w", (2, 3, 4, 5, 6), "offset", [3.0, 3.0]),
        ("b h w c", (2, 5, 7, 3), "zero_sample", [0.5, 0.01]),
        ("b c h w", (3, 3, 5, 4), "constant_sample", [4.0, 4.0, 0.2]),
        ("b c h w", (2, 3, 4, 5), "equal", [1.5, 1.5]),
        ("b f h w c", (1, 3, 4, 5, 2), "scaled", [0.002]),
        ("b c l", (2, 3, 17), "tiny_delta", [80.0, 0.3]),
    ]
    out = []
    for seed, (layout, shape, kind, sigma) in enumerate(specs):
        ex = _example(layout, shape, kind, seed, sigma)
        out.append(dataclasses.replace(ex, pred_cond=ex.pred_cond.to(device), pred_uncond=ex.pred_uncond.to(device)))
    return out


# -- hypothesis generators -----------------------------------------------------------------------------
def _st() -> Any:
    try:
        import hypothesis.strategies as st
    except ImportError as exc:  # pragma: no cover - hypothesis is in the test extra
        raise ImportError("guidekit.testing's generators need hypothesis: pip install hypothesis") from exc
    return st


def layouts() -> Any:
    """Native layouts: ``"b c h w"``, ``"b c f h w"``, ``"b f c h w"``, channels-last and 1D (:data:`LAYOUTS`)."""
    return _st().sampled_from(LAYOUTS)


def shapes(layout: str, max_side: int = 7, max_batch: int = 4) -> Any:
    """Shapes for ``layout`` with pairwise distinct axis sizes, so a transposition bug changes the shape."""
    st = _st()
    axes = parse_layout(layout)
    b_at = axes.index("b")

    def with_batch(batch: int) -> Any:
        others = st.lists(
            st.integers(1, max_side).filter(lambda v: v != batch),
            min_size=len(axes) - 1,
            max_size=len(axes) - 1,
            unique=True,
        )
        return others.map(lambda rest: (*rest[:b_at], batch, *rest[b_at:]))

    return st.integers(1, max_batch).flatmap(with_batch)


def pred_pairs(shape: Sequence[int], dtype: torch.dtype = torch.float64, kinds: Sequence[str] = KINDS) -> Any:
    """``(pred_cond, pred_uncond)`` pairs of ``shape``: a kind from :data:`KINDS`, a seed and a magnitude."""
    st = _st()
    return st.builds(
        lambda kind, seed, mag: make_pair(shape, kind, seed, mag, dtype),
        st.sampled_from(tuple(kinds)),
        st.integers(0, 2**31 - 1),
        st.sampled_from((1.0, 1e-3, 1e3)),
    )


def sigmas(min_value: float = 0.002, max_value: float = 80.0) -> Any:
    """EDM sigmas, log-uniform in ``[min_value, max_value]``, plus the common interval bounds."""
    st = _st()
    special = [s for s in (min_value, 0.28, 1.0, 5.42, max_value) if min_value <= s <= max_value]
    log_uniform = st.floats(math.log(min_value), math.log(max_value)).map(math.exp)
    return st.one_of(st.sampled_from(special), log_uniform)


def examples(dtype: torch.dtype = torch.float64, layout: str | None = None) -> Any:
    """:class:`Example` s: a layout, a shape with distinct sizes, a prediction pair and per-sample sigmas."""
    st = _st()

    @st.composite
    def draw_example(draw: Any) -> Example:
        lay = layout if layout is not None else draw(layouts())
        native = draw(shapes(lay))
        kind = draw(st.sampled_from(KINDS))
        seed = draw(st.integers(0, 2**31 - 1))
        batch = native[parse_layout(lay).index("b")]
        same = draw(st.booleans())
        sig = [draw(sigmas())] * batch if same else draw(st.lists(sigmas(), min_size=batch, max_size=batch))
        return _example(lay, native, kind, seed, sig).cast(dtype)

    return draw_example()


# -- helpers of the checks -----------------------------------------------------------------------------
def _fail(strategy: Any, check: str, example: Example | None, detail: str) -> ContractError:
    where = f" on {example}" if example is not None else ""
    return ContractError(f"{strategy!r} broke {check!r}{where}: {detail}")


def _assert_close(actual: Tensor, expected: Tensor, what: str) -> str | None:
    """``None`` if close (relative to the overall magnitude of ``expected``), else a description."""
    if actual.shape != expected.shape:
        return f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.to(torch.float64), expected.to(torch.float64)
    rtol = _RTOL.get(expected.dtype, 1e-4)
    bound = rtol * (e.abs() + e.abs().max().clamp_min(1e-12))
    err = (a - e).abs()
    if bool((err <= bound).all()):
        return None
    return f"{what}: max abs error {float(err.max()):.3g} (allowed ~{rtol:g} relative)"


def _select(ctx: GuidanceContext, index: slice) -> GuidanceContext:
    """The context of a slice of the batch."""
    return ctx.replace(
        sigma=ctx.sigma[index],
        sigma_next=None if ctx.sigma_next is None else ctx.sigma_next[index],
        x=None if ctx.x is None else ctx.x[index],
        condition=None if ctx.condition is None else ctx.condition[index],
    )


def _map_x(ctx: GuidanceContext, fn: Callable[[Tensor], Tensor]) -> GuidanceContext:
    return ctx if ctx.x is None else ctx.replace(x=fn(ctx.x))


def _tree_snapshot(state: Any) -> Any:
    if isinstance(state, Tensor):
        return state.detach().clone()
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return {f.name: _tree_snapshot(getattr(state, f.name)) for f in dataclasses.fields(state)}
    if isinstance(state, tuple | list):
        return [_tree_snapshot(s) for s in state]
    if isinstance(state, dict):
        return {k: _tree_snapshot(v) for k, v in state.items()}
    return state


def _tree_equal(a: Any, b: Any) -> bool:
    """Exact equality of two states (tensors compared by value, dtype and shape)."""
    a, b = _tree_snapshot(a), _tree_snapshot(b)
    return _snap_equal(a, b)


def _snap_equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_snap_equal, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_snap_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def _second_part(ex: Example) -> Example:
    """A different batch of the same shape, to concatenate with ``ex``."""
    c, u = make_pair(ex.pred_cond.shape, "independent", 99, dtype=ex.pred_cond.dtype)
    sigma = torch.flip(ex.sigma, (0,)) * 1.7  # different noise levels: a batch that mixes them
    return dataclasses.replace(
        ex, pred_cond=c.to(ex.pred_cond.device), pred_uncond=u.to(ex.pred_cond.device), sigma=sigma
    )


def _cat(a: Example, b: Example) -> Example:
    return dataclasses.replace(
        a,
        pred_cond=torch.cat([a.pred_cond, b.pred_cond]),
        pred_uncond=torch.cat([a.pred_uncond, b.pred_uncond]),
        sigma=torch.cat([a.sigma, b.sigma]),
    )


# -- the checks ----------------------------------------------------------------------------------------
def check_shape_dtype_device(s: GuidanceStrategy, ex: Example) -> str | None:
    """G1: the output has the input's shape, dtype and device, through ``__call__`` and ``step``."""
    for dtype in DTYPES:
        e = ex.cast(dtype)
        c, u, ctx = e.pred_cond, e.pred_uncond, e.context()
        outs = [s(c, u, ctx), s.step(c, u, ctx, s.init_state(c))[0]]
        for out in outs:
            if not isinstance(out, Tensor):
                return f"returned {type(out).__name__}, expected a Tensor"
            got = (tuple(out.shape), out.dtype, out.device)
            if got != (tuple(c.shape), c.dtype, c.device):
                return f"output (shape, dtype, device) {got}, expected {(tuple(c.shape), c.dtype, c.device)}"
    return None


def check_finite(s: GuidanceStrategy, ex: Example) -> str | None:
    """G1: finite inputs give a finite output, also when ``c == u``, a sample is zero or all is zero."""
    c, u = ex.pred_cond, ex.pred_uncond
    zero_first = c.clone(), u.clone()
    zero_first[0][0], zero_first[1][0] = 0.0, 0.0
    cases = {"as given": (c, u), "c == u": (c, c), "sample 0 zero": zero_first, "all zero": (c * 0, u * 0)}
    for name, (pc, pu) in cases.items():
        for dtype in (torch.float32, torch.float64):
            pc_, pu_ = pc.to(dtype), pu.to(dtype)
            out = s(pc_, pu_, ex.cast(dtype).context(allow_nonfinite=True))
            if not all_finite(out):
                return f"non-finite output for inputs {name!r} in {dtype}"
    return None


def check_batch_independence(s: GuidanceStrategy, ex: Example) -> str | None:
    """G2: guiding a concatenated batch equals guiding each part (sigma per sample differs)."""
    if ex.pred_cond.shape[0] < 2:
        ex = _cat(ex, _second_part(ex))
    whole = s(ex.pred_cond, ex.pred_uncond, ex.context())
    ctx = ex.context()
    k = ex.pred_cond.shape[0] // 2
    parts = [s(ex.pred_cond[idx], ex.pred_uncond[idx], _select(ctx, idx)) for idx in (slice(0, k), slice(k, None))]
    return _assert_close(whole, torch.cat(parts), "batch vs parts")


def check_equal_inputs(s: GuidanceStrategy, ex: Example) -> str | None:
    """G5: ``pred_cond == pred_uncond`` gives ``pred_cond`` (from a fresh state)."""
    for dtype in (torch.float64, torch.float32):
        c = ex.pred_cond.to(dtype)
        err = _assert_close(s(c, c.clone(), ex.cast(dtype).context()), c, f"c == u in {dtype}")
        if err:
            return err
    return None


def check_call_matches_step(s: GuidanceStrategy, ex: Example) -> str | None:
    """``__call__`` equals ``step`` from ``init_state`` (and ``combine`` when stateless); calls are
    deterministic and leave their inputs unchanged."""
    c, u, ctx = ex.pred_cond, ex.pred_uncond, ex.context()
    c_before, u_before = c.clone(), u.clone()
    first = s(c, u, ctx)
    if not (torch.equal(c, c_before) and torch.equal(u, u_before)):
        return "the call modified pred_cond or pred_uncond in place"
    if not torch.equal(first, s(c, u, ctx)):
        return "two identical calls gave different outputs"
    state = s.init_state(c)
    stepped, _ = s.step(c, u, ctx, state)
    if not torch.equal(first, stepped):
        return "__call__ and step(init_state) differ"
    if state is None and not torch.equal(first, s.combine(c, u, ctx)):
        return "stateless strategy: __call__ and combine differ"
    if not _tree_equal(s.init_state(c), s.init_state(c)):
        return "init_state is not deterministic"
    return None


def check_state_discipline(s: GuidanceStrategy, ex: Example) -> str | None:
    """State advances once per step: a corrector (``substep > 0``) returns its input state, nothing is
    mutated in place, and replaying a run from ``init_state`` reproduces it exactly (G3)."""
    c, u = ex.pred_cond, ex.pred_uncond
    batch = c.shape[0]
    schedule = torch.tensor([12.0, 4.0, 1.0, 0.3, 0.0], device=c.device)

    def run() -> list[Tensor] | str:
        state, outs = s.init_state(c), []
        for i in range(3):
            for sub in (0, 1):
                pc, pu = c * (1 + 0.1 * i + 0.05 * sub), u * (1 - 0.07 * i) + 0.01 * sub
                ctx = ex.context(
                    sigma=schedule[i + sub].expand(batch).clone(),
                    sigma_next=schedule[i + 1].expand(batch).clone(),
                    step=i,
                    num_steps=4,
                    substep=sub,
                    sigmas=schedule,
                )
                before = _tree_snapshot(state)
                out, new_state = s.step(pc, pu, ctx, state)
                if not _snap_equal(_tree_snapshot(state), before):
                    return f"step {i} substep {sub} mutated its input state in place"
                if sub > 0 and not _tree_equal(new_state, state):
                    return f"step {i}: the corrector evaluation (substep 1) changed the state"
                state = new_state
                outs.append(out)
        return outs

    first, again = run(), run()
    if isinstance(first, str):
        return first
    if isinstance(again, str) or not all(torch.equal(a, b) for a, b in zip(first, again, strict=True)):
        return "replaying the same run from init_state gave different outputs"
    return None


def check_rank_flattening(s: GuidanceStrategy, ex: Example) -> str | None:
    """G4: guiding ``(b, c, f, h, w)`` equals guiding it flattened to ``(b, c, f*h, w)`` (and 4D to 3D)."""
    c, u = ex.pred_cond, ex.pred_uncond
    if c.ndim < 4:
        return None
    ctx = ex.context()
    full = s(c, u, ctx).flatten(2, 3)
    flat = s(c.flatten(2, 3), u.flatten(2, 3), _map_x(ctx, lambda x: x.flatten(2, 3)))
    return _assert_close(flat, full, "flattened vs full rank")


def check_layout_round_trip(s: GuidanceStrategy, ex: Example) -> str | None:
    """Native layout -> ``to_canonical`` (a strided view) -> guide -> ``from_canonical`` equals guiding the
    contiguous canonical tensors; so does any non-contiguous input."""
    c, u, ctx = ex.pred_cond, ex.pred_uncond, ex.context()
    expected = s(c, u, ctx)
    native_c, native_u = from_canonical(c, ex.layout).contiguous(), from_canonical(u, ex.layout).contiguous()
    viewed = s(to_canonical(native_c, ex.layout), to_canonical(native_u, ex.layout), ctx)
    err = _assert_close(from_canonical(viewed, ex.layout), from_canonical(expected, ex.layout), "layout round trip")
    if err:
        return err

    def strided(x: Tensor) -> Tensor:
        return x.transpose(0, -1).contiguous().transpose(0, -1)

    return _assert_close(s(strided(c), strided(u), ctx), expected, "non-contiguous input")


def check_needs_uncond(s: GuidanceStrategy, ex: Example) -> str | None:
    """Where ``needs_uncond`` is False the output must not depend on ``pred_uncond`` (the loop skips it)."""
    c, u = ex.pred_cond, ex.pred_uncond
    batch = c.shape[0]
    contexts = [ex.context()]
    contexts += [ex.context(sigma=torch.full((batch,), v, device=c.device)) for v in (0.01, 0.5, 3.0, 50.0)]
    other = u * -2.0 + 3.0
    for ctx in contexts:
        if s.needs_uncond(ctx) and s.needs_uncond_state(ctx, s.init_state(c)):
            continue
        if not torch.equal(s(c, u, ctx), s(c, other, ctx)):
            sig = [round(float(v), 4) for v in ctx.sigma]
            return f"needs_uncond is False at sigma={sig} but the output depends on pred_uncond"
    return None


def check_spec_round_trip(s: GuidanceStrategy, ex: Example) -> str | None:
    """``build(to_spec(s)) == s``, also through the spec's JSON text."""
    spec = to_spec(s)
    if build(spec) != s:
        return f"build(to_spec(s)) != s (spec {spec})"
    text = spec.model_dump_json()
    if ComponentSpec.model_validate_json(text) != spec:
        return f"the spec does not survive JSON: {text}"
    if build(json.loads(text)) != s:
        return f"build(json) != s for {text}"
    return None


GRADIENT_KINDS: tuple[str, ...] = ("independent", "correlated", "offset")
"""Example kinds at which gradients are checked: generic points. Equal, collinear (scaled), constant or
zero samples sit where norms, angles and projections have no derivative, by construction."""


def check_gradients(s: GuidanceStrategy, ex: Example) -> str | None:
    """The guided output is differentiable in both predictions: ``torch.autograd.gradcheck`` in float64
    (fast mode) at generic examples (:data:`GRADIENT_KINDS`). Loss guidance and learned weights
    backpropagate through strategies; an in-place op or a ``.tolist()`` breaks that silently."""
    if ex.kind not in GRADIENT_KINDS:
        return None
    ex64 = ex.cast(torch.float64)
    ctx = ex64.context()
    c = ex64.pred_cond.detach().clone().requires_grad_()
    u = ex64.pred_uncond.detach().clone().requires_grad_()
    state = s.init_state(ex64.pred_cond)

    def guided(c: Tensor, u: Tensor) -> Tensor:
        return s.step(c, u, ctx, state)[0]

    try:
        torch.autograd.gradcheck(guided, (c, u), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)
    except RuntimeError as exc:  # torch's GradcheckError is a RuntimeError
        return f"gradcheck failed: {str(exc).splitlines()[0]}"
    return None


def _plan_predictions(plan: Sequence[Branch], c: Tensor, u: Tensor) -> dict[str, Tensor]:
    """Predictions for a plan: ``cond`` gets ``c``, every other branch ``u`` (the contract's pair)."""
    return {b.name: c if b.name == "cond" else u for b in plan}


def check_plan(s: GuidanceStrategy, ex: Example) -> str | None:
    """The plan is a tuple of :class:`~guidekit.branch.Branch` with unique names, on models, perturbation
    kinds and attention observers the strategy declares, and names every prediction the combine reads (a
    combine given only the plan's predictions runs and matches the two-branch call where the plan is
    ``cond``/``uncond``)."""
    c, u = ex.pred_cond, ex.pred_uncond
    for step, sub in ((0, 0), (0, 1), (5, 0)):
        ctx = ex.context(step=step, substep=sub)
        state = s.init_state(c)
        plan = s.branches(ctx, state)
        if not isinstance(plan, tuple) or not all(isinstance(b, Branch) for b in plan):
            return f"branches() returned {plan!r}, expected a tuple of Branch"
        names = [b.name for b in plan]
        if len(set(names)) != len(names):
            return f"branches() named a branch twice: {names}"
        unknown = {b.model for b in plan} - s.models()
        if unknown:
            return f"branches() used models {sorted(unknown)} that models() = {sorted(s.models())} does not declare"
        watched = {k for b in plan if b.observe is not None for k in b.observe.kinds} - s.observers()
        if watched:
            return (
                f"branches() recorded attention maps {sorted(watched)} that observers() = "
                f"{sorted(s.observers())} does not declare"
            )
        kinds = {b.perturbation.kind for b in plan if b.perturbation is not None} - s.perturbations()
        if kinds:
            return (
                f"branches() used perturbations {sorted(kinds)} that perturbations() = "
                f"{sorted(s.perturbations())} does not declare"
            )
        try:
            out, _ = s.step_branches(_plan_predictions(plan, c, u), ctx, state)
        except KeyError as exc:
            return f"combine_branches read a prediction the plan {names} does not name: {exc}"
        if out.shape != c.shape:
            return (
                f"combine_branches on the plan's predictions gave shape {tuple(out.shape)}, expected {tuple(c.shape)}"
            )
        if set(names) == {"cond", "uncond"} and not torch.equal(out, s.step(c, u, ctx, state)[0]):
            return "combine_branches on the plan's predictions differs from step(c, u)"
    return None


class _CountingBackend(Backend):
    """A contract backend that answers every branch from the example pair and counts the rows it runs."""

    def __init__(self, c: Tensor, u: Tensor, models: frozenset[str]) -> None:
        self.c, self.u, self._models, self.rows = c, u, models, 0

    def models(self) -> frozenset[str]:
        return self._models

    def prediction(self, model: str) -> Any:
        return "x0"

    def supports(self, perturbation: Any) -> bool:
        return True  # a stand-in network: every perturbation is "applied" (the pair answers every branch)

    def forward(self, x: Tensor, sigma: Tensor, branches: Sequence[Branch], conditions: Any) -> dict[str, Tensor]:
        carried = branches[0].perturbation.conditions() if branches[0].perturbation is not None else ()
        self.rows += len(branches) * (1 + len(carried)) * x.shape[0]  # a perturbation's own conditions' rows
        preds = _plan_predictions(branches, self.c, self.u)
        for branch in branches:  # an observed branch gets stand-in maps over its full-size tokens
            if branch.observe is not None:
                for kind in sorted(branch.observe.kinds):
                    preds[observation_key(branch.name, f"{kind}:stand-in")] = _stand_in_map(self.c, kind)
        return preds


def _stand_in_map(like: Tensor, kind: str) -> Tensor:
    """A fixed attention map over the ``n`` spatial positions of ``like``: ``(b, n, n)`` for self-attention,
    ``(b, n, 3)`` (three context tokens) for cross-attention; softmax rows."""
    n = math.prod(like.shape[2:])
    gen = torch.Generator().manual_seed(7 if kind == "self" else 8)
    logits = 3.0 * torch.randn(like.shape[0], n, n if kind == "self" else 3, generator=gen, dtype=torch.float64)
    return torch.softmax(logits, dim=-1).to(device=like.device, dtype=like.dtype)


def check_nfe(s: GuidanceStrategy, ex: Example) -> str | None:
    """Through the engine over a predictor/corrector run, the NFE counted from the plans equals the rows
    the backend evaluated, and the engine's output is the strategy's own combine."""
    from .engine import Engine, Position

    c, u = ex.pred_cond, ex.pred_uncond
    backend = _CountingBackend(c, u, s.models() | {"main"})
    engine = Engine(s, backend, {})
    schedule = torch.tensor([12.0, 4.0, 1.0, 0.0], dtype=torch.float64)
    x = ex.context().x
    for i in range(3):
        for sub in (0, 1) if i < 2 else (0,):
            position = Position(i, 3, sub, schedule, float(schedule[i]), float(schedule[i + 1]))
            engine.evaluate(x, schedule[i + sub].expand(c.shape[0]).to(c.device), position)
    if engine.nfe * c.shape[0] != backend.rows:
        return f"the engine counted {engine.nfe} NFE per sample, the backend evaluated {backend.rows} rows"
    return None


CHECKS: dict[str, Callable[[GuidanceStrategy, Example], str | None]] = {
    "shape_dtype_device": check_shape_dtype_device,
    "finite": check_finite,
    "batch_independence": check_batch_independence,
    "equal_inputs": check_equal_inputs,
    "call_matches_step": check_call_matches_step,
    "state_discipline": check_state_discipline,
    "rank_flattening": check_rank_flattening,
    "layout_round_trip": check_layout_round_trip,
    "needs_uncond": check_needs_uncond,
    "plan": check_plan,
    "nfe": check_nfe,
    "gradients": check_gradients,
    "spec_round_trip": check_spec_round_trip,
}
"""Contract check name -> ``check(strategy, example)`` returning ``None`` or what went wrong."""


# -- running the contract ------------------------------------------------------------------------------
def example_strategy(name: str) -> GuidanceStrategy:
    """The instance the contract checks for a registered name: ``contract_example()`` or ``build(name)``."""
    cls = STRATEGIES.get(name)
    return cls.contract_example() if issubclass(cls, GuidanceStrategy) else build(name)


def _resolve(strategy: str | GuidanceStrategy) -> GuidanceStrategy:
    s = example_strategy(strategy) if isinstance(strategy, str) else strategy
    if not isinstance(s, GuidanceStrategy):
        raise TypeError(f"strategy: expected a GuidanceStrategy or a registered name, got {type(s).__name__}")
    return s


def _exemptions(s: GuidanceStrategy) -> dict[str, str]:
    return dict(type(s).contract_exempt)


def _run_check(s: GuidanceStrategy, check: str, ex: Example) -> str | None:
    """What went wrong, or ``None``; a crash on a valid input breaks the contract too."""
    try:
        return CHECKS[check](s, ex)
    except Exception as exc:
        return f"raised {type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class ContractCase:
    """One ``(strategy, check)`` pair; ``str(case)`` is a pytest id, :meth:`run` raises :class:`ContractError`."""

    label: str
    check: str
    strategy: str | GuidanceStrategy

    def instance(self) -> GuidanceStrategy:
        return _resolve(self.strategy)

    @property
    def exempt(self) -> str | None:
        """The strategy's documented reason for not taking this check, if any."""
        return _exemptions(self.instance()).get(self.check)

    def run(self, example: Example | None = None) -> None:
        """Run the check on ``example``, or on every :func:`fixed_examples` input when None."""
        s = self.instance()
        for ex in [example] if example is not None else fixed_examples():
            detail = _run_check(s, self.check, ex)
            if detail is not None:
                raise _fail(s, self.check, ex, detail)

    def __str__(self) -> str:
        return f"{self.label}-{self.check}"


def contract_cases(
    strategies: Iterable[str | GuidanceStrategy] | None = None, checks: Iterable[str] | None = None
) -> list[ContractCase]:
    """Every ``(strategy, check)`` pair; ``strategies`` defaults to every registered name, plugins included.

    Instances are built lazily in :meth:`ContractCase.run`, so a strategy that fails to build fails its
    tests instead of the test collection.
    """
    items = list(STRATEGIES.names() if strategies is None else strategies)
    names = list(CHECKS if checks is None else checks)
    unknown = [c for c in names if c not in CHECKS]
    if unknown:
        raise ValueError(f"checks: expected names from {list(CHECKS)}, got {unknown}")
    return [ContractCase(item if isinstance(item, str) else repr(item), c, item) for item in items for c in names]


def check_strategy(
    strategy: str | GuidanceStrategy,
    *,
    checks: Iterable[str] | None = None,
    examples: Iterable[Example] | None = None,
    device: str | torch.device = "cpu",
) -> None:
    """Run the whole contract on ``strategy`` (an instance or a registered name).

    ``examples`` default to :func:`fixed_examples` on ``device`` (e.g. ``"cuda"`` to check a GPU path).

    Raises:
        ContractError: listing every failed check with the first input it failed on. Checks the strategy
            exempts itself from (``contract_exempt``) are skipped.
    """
    s = _resolve(strategy)
    exempt = _exemptions(s)
    inputs = list(fixed_examples(device) if examples is None else examples)
    names = [c for c in (CHECKS if checks is None else checks) if c not in exempt]
    failures = []
    for check in names:
        for ex in inputs:
            detail = _run_check(s, check, ex)
            if detail is not None:
                failures.append(f"{check} on {ex}: {detail}")
                break
    if failures:
        raise ContractError(
            f"{s!r} failed {len(failures)} of {len(names)} contract checks:\n- " + "\n- ".join(failures)
        )
