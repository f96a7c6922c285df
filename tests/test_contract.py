"""The shared strategy contract (guidekit.testing) over every registered name, plugins included,
and proof that the contract has teeth: deliberately broken strategies fail the check aimed at them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import given, settings
from torch import Tensor

import guidekit as gk
from guidekit.ops.guidance import cfg
from guidekit.ops.shapes import upcast
from guidekit.registry import STRATEGIES
from guidekit.testing import (
    CHECKS,
    ContractCase,
    ContractError,
    check_strategy,
    contract_cases,
    example_strategy,
    examples,
    fixed_examples,
)

# Every registered name with its default instance, plus combinators around stateful inner strategies.
EXTRA = [
    gk.Interval(gk.APG()),
    gk.Rescale(gk.APG(scale=4.0, eta=0.3)),
    gk.APG(momentum=0.0, norm_threshold=0.0),
    gk.Interval(gk.Rescale(gk.CFG(3.0)), sigma_lo=0.0, sigma_hi=2.0),
]


def _params(cases: list[ContractCase]) -> list[Any]:
    out = []
    for case in cases:
        try:
            reason = case.exempt
        except Exception:  # a strategy that cannot even be built fails in the test body, not at collection
            reason = None
        marks = [pytest.mark.skip(reason=f"exempt: {reason}")] if reason else []
        out.append(pytest.param(case, id=str(case), marks=marks))
    return out


ALL_CASES = contract_cases() + contract_cases(EXTRA)
PROPERTY_CASES = [c for c in ALL_CASES if c.check != "spec_round_trip"]  # independent of the input


def test_every_registered_name_is_covered() -> None:
    labels = {c.label for c in ALL_CASES}
    assert set(gk.strategies.names()) <= labels
    assert {"cfg", "apg", "rescale", "interval"} <= labels


@pytest.mark.parametrize("case", _params(ALL_CASES))
def test_contract_on_fixed_examples(case: ContractCase) -> None:
    case.run()


@pytest.mark.parametrize("case", _params(PROPERTY_CASES))
@settings(max_examples=8)
@given(example=examples())
def test_contract_on_generated_examples(case: ContractCase, example: Any) -> None:
    case.run(example)


# -- the contract has teeth -----------------------------------------------------------------------------
class _Base(gk.GuidanceStrategy):
    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: gk.GuidanceContext) -> Tensor:
        return cfg(pred_cond, pred_uncond, 3.0)


@dataclass(frozen=True)
class BatchCoupled(_Base):
    """Scale from the *batch* mean energy: samples influence each other."""

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: gk.GuidanceContext) -> Tensor:
        energy = (pred_cond - pred_uncond).abs().mean()
        return cfg(pred_cond, pred_uncond, 1.0 + 1.0 / (1.0 + energy))


@dataclass(frozen=True)
class MutatesState(_Base):
    """Keeps a running sum by updating the state tensor in place."""

    def init_state(self, like: Tensor) -> Tensor:
        return torch.zeros_like(like)

    def combine_step(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: Any, state: Any) -> tuple[Tensor, Any]:
        state.add_(pred_cond - pred_uncond)
        return pred_cond + state, state


@dataclass(frozen=True)
class AdvancesOnCorrector(_Base):
    """Advances a counter on every evaluation, corrector included."""

    def init_state(self, like: Tensor) -> Tensor:
        return torch.zeros(())

    def combine_step(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: Any, state: Any) -> tuple[Tensor, Any]:
        return cfg(pred_cond, pred_uncond, 2.0 + float(state)), state + 1


@dataclass(frozen=True)
class LiesAboutUncond(_Base):
    """Says it needs no unconditional pass but uses it."""

    def needs_uncond(self, ctx: gk.GuidanceContext) -> bool:
        return False


@dataclass(frozen=True)
class LastThreeDims(_Base):
    """Normalises over dims (-1, -2, -3), as several reference codes do: per-channel on 5D video."""

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: gk.GuidanceContext) -> Tensor:
        delta = pred_cond - pred_uncond
        norm = delta.norm(dim=(-1, -2, -3), keepdim=True).clamp_min(1e-12)
        return pred_cond + 2.0 * delta / norm


@dataclass(frozen=True)
class AlwaysFloat32(_Base):
    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: gk.GuidanceContext) -> Tensor:
        return cfg(upcast(pred_cond), upcast(pred_uncond), 3.0).float()


@dataclass(frozen=True)
class Biased(_Base):
    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: gk.GuidanceContext) -> Tensor:
        return cfg(pred_cond, pred_uncond, 3.0) + 0.01


@dataclass(frozen=True)
class UsesView(_Base):
    """``.view`` needs contiguous memory: breaks on a permuted (b, f, c, h, w) -> (b, c, f, h, w) view."""

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: gk.GuidanceContext) -> Tensor:
        flat = cfg(pred_cond, pred_uncond, 3.0).view(pred_cond.shape[0], -1)
        return flat.view(pred_cond.shape)


@dataclass(frozen=True)
class NaNWhenEqual(_Base):
    """Divides by ||Δ||: NaN when c == u."""

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: gk.GuidanceContext) -> Tensor:
        delta = pred_cond - pred_uncond
        return pred_cond + delta / delta.norm()


@dataclass(frozen=True)
class CallDiffersFromStep(_Base):
    def __call__(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: Any = None) -> Tensor:
        return cfg(pred_cond, pred_uncond, 4.0)


@dataclass(frozen=True)
class ModifiesInput(_Base):
    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: gk.GuidanceContext) -> Tensor:
        return pred_uncond.mul_(-2.0).add_(pred_cond.mul(3.0))


@dataclass(frozen=True)
class DetachesScale(_Base):
    """Reads a per-sample scale back to the host (``.tolist()``): the output loses its gradient in ``u``."""

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: gk.GuidanceContext) -> Tensor:
        norms = (pred_cond - pred_uncond).flatten(1).norm(dim=1).tolist()
        scale = torch.tensor([1.0 + 0.1 * n for n in norms], dtype=pred_cond.dtype)
        return pred_uncond + scale.reshape(-1, *([1] * (pred_cond.ndim - 1))) * (pred_cond - pred_uncond)


@dataclass(frozen=True)
class InPlaceOnAView(_Base):
    """Writes into a view of a tensor autograd needs: ``backward()`` raises."""

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: gk.GuidanceContext) -> Tensor:
        delta = pred_cond - pred_uncond
        energy = delta.square()
        delta.mul_(2.0)
        return pred_uncond + energy * delta


@dataclass(frozen=True)
class UndeclaredPerturbation(_Base):
    """Plans a perturbed forward that ``perturbations()`` does not declare (a backend could not refuse it early)."""

    def branches(self, ctx: gk.GuidanceContext, state: Any) -> tuple[gk.Branch, ...]:
        return (gk.COND, gk.UNCOND, gk.Branch("perturbed", perturbation=gk.perturbations.SkipBlocks(("x",))))


@dataclass(frozen=True)
class DoublesScale(_Base):
    """Its __post_init__ rewrites a parameter, so build(to_spec(s)) != s."""

    scale: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", float(self.scale) * 2)


@pytest.mark.parametrize(
    ("strategy", "check"),
    [
        (BatchCoupled(), "batch_independence"),
        (MutatesState(), "state_discipline"),
        (AdvancesOnCorrector(), "state_discipline"),
        (LiesAboutUncond(), "needs_uncond"),
        (LastThreeDims(), "rank_flattening"),
        (AlwaysFloat32(), "shape_dtype_device"),
        (Biased(), "equal_inputs"),
        (UsesView(), "layout_round_trip"),
        (NaNWhenEqual(), "finite"),
        (CallDiffersFromStep(), "call_matches_step"),
        (ModifiesInput(), "call_matches_step"),
        (DetachesScale(), "gradients"),
        (InPlaceOnAView(), "gradients"),
        (UndeclaredPerturbation(), "plan"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else v,
)
def test_contract_catches_broken_strategy(strategy: gk.GuidanceStrategy, check: str) -> None:
    with pytest.raises(ContractError, match=check):
        check_strategy(strategy, checks=[check])


def test_contract_catches_spec_that_does_not_round_trip() -> None:
    STRATEGIES.register("test-doubles-scale", DoublesScale, override=True)
    try:
        with pytest.raises(ContractError, match="spec_round_trip"):
            check_strategy(DoublesScale(), checks=["spec_round_trip"])
    finally:
        STRATEGIES.unregister("test-doubles-scale")


def test_check_strategy_lists_every_failed_check() -> None:
    with pytest.raises(ContractError) as info:
        check_strategy(Biased(), checks=["equal_inputs", "shape_dtype_device", "spec_round_trip"])
    text = str(info.value)
    assert "failed 2 of 3 contract checks" in text
    assert "equal_inputs" in text and "spec_round_trip" in text and "shape_dtype_device on" not in text


def test_exemptions_skip_a_check_with_its_reason() -> None:
    @dataclass(frozen=True)
    class Exempt(LastThreeDims):
        contract_exempt: ClassVar[dict[str, str]] = {"rank_flattening": "per-channel norms by design"}

    check_strategy(Exempt(), checks=["rank_flattening"])
    (case,) = contract_cases([Exempt()], checks=["rank_flattening"])
    assert case.exempt == "per-channel norms by design"


def test_contract_example_classmethod_is_used() -> None:
    @dataclass(frozen=True)
    class NeedsArgs(_Base):
        scale: float

        @classmethod
        def contract_example(cls) -> NeedsArgs:
            return cls(scale=2.5)

    STRATEGIES.register("test-needs-args", NeedsArgs, override=True)
    try:
        assert example_strategy("test-needs-args") == NeedsArgs(2.5)
        check_strategy("test-needs-args", checks=["spec_round_trip", "equal_inputs"])
    finally:
        STRATEGIES.unregister("test-needs-args")


def test_contract_cases_refuse_unknown_check_names() -> None:
    with pytest.raises(ValueError, match="no_such_check"):
        contract_cases(["cfg"], checks=["no_such_check"])


def test_fixed_examples_cover_ranks_layouts_and_kinds() -> None:
    exs = fixed_examples()
    assert {e.pred_cond.ndim for e in exs} == {3, 4, 5}
    assert {"b c h w", "b c f h w", "b f c h w"} <= {e.layout for e in exs}
    assert {e.kind for e in exs} >= {"equal", "zero_sample", "constant_sample"}
    assert set(CHECKS) == {c.check for c in contract_cases(["cfg"])}
