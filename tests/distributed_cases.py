"""The cases of ``test_distributed.py``, and the worker ``torchrun`` starts on every rank.

``python -m torch.distributed.run --nproc-per-node W tests/distributed_cases.py OUT`` runs every case
branch-parallel (gloo) and writes ``OUT/rank{r}.pt``: per case the sample, the rows this rank evaluated and
the engine's NFE, plus the message each disagreement case raised. The test runs the same cases in one
process and compares.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import guidekit as gk
from guidekit import distributed
from guidekit.engine import Backend
from guidekit.guided import GuidedDenoiser, default_schedule
from guidekit.oracle import UNCOND, GaussianMixture
from guidekit.samplers import adapt

NEGATIVE = gk.Branch("negative", condition="negative")
STEPS = 6


@dataclass(frozen=True)
class AwayFromNegative(gk.GuidanceStrategy):
    """A three-branch strategy: CFG plus a push away from a second negative condition (as in test_engine)."""

    scale: float = 3.0
    push: float = 0.5

    def branches(self, ctx: gk.GuidanceContext, state: Any) -> tuple[gk.Branch, ...]:
        return (gk.COND, gk.UNCOND, NEGATIVE)

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: gk.GuidanceContext) -> Tensor:
        return gk.ops.guidance.cfg(pred_cond, pred_uncond, self.scale)

    def combine_branches(self, preds: Any, ctx: gk.GuidanceContext, state: Any) -> tuple[Tensor, Any]:
        c = preds["cond"]
        return self.combine(c, preds["uncond"], ctx) + self.push * (c - preds["negative"]), state


STRATEGIES: dict[str, Callable[[], gk.GuidanceStrategy]] = {
    "cfg": lambda: gk.CFG(3.0),
    "apg": lambda: gk.APG(scale=4.0, eta=0.0, norm_threshold=5.0, momentum=-0.5),
    "interval": lambda: gk.Interval(gk.CFG(3.0), sigma_lo=0.3, sigma_hi=8.0),  # uncond on the middle steps only
    "adaptive": lambda: gk.AdaptiveGuidance(gk.CFG(3.0), threshold=0.95),  # switches mid-run
    "three": lambda: AwayFromNegative(),
    "autoguidance": lambda: gk.AutoGuidance(2.0),  # two groups (main, weak): each splits the batch
}
SAMPLERS = ("euler", "heun", "dpmpp-2m")
STOCHASTIC = ("cfg/euler-ancestral/image/rowwise", "cfg/euler-ancestral/video/batched")
"""Noise from one generator per sample, seeded the same on every rank."""


@dataclass(frozen=True)
class Shape:
    """A model and its batch: an image EDM model ``(3, 3, 4, 4)`` or a video v-model ``(2, f, c, h, w)``."""

    oracle: GaussianMixture
    prediction: str
    layout: str
    batch: int


SHAPES = {
    "image": Shape(GaussianMixture.random(3, 2, (3, 4, 4), spread=2.0, std=0.4, seed=7), "edm", "b c h w", 3),
    "video": Shape(GaussianMixture.random(3, 2, (3, 2, 2, 2), spread=3.0, std=0.5, seed=11), "v", "b f c h w", 2),
}
MODELS = ("rowwise", "batched")
"""``rowwise`` evaluates each row alone (bitwise batch-independent by construction); ``batched`` is the
oracle as is (its float64 matmuls may differ in the last ulp between batch sizes)."""


class Counting:
    """The oracle as a native model that adds the rows it evaluates to ``tally[0]`` (``rowwise``: one row per
    call)."""

    def __init__(self, model: Callable[..., Tensor], rowwise: bool, tally: list[int]) -> None:
        self.model, self.rowwise, self.tally = model, rowwise, tally

    def __call__(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        self.tally[0] += x.shape[0]
        if not self.rowwise:
            return self.model(x, t, labels)
        t = torch.as_tensor(t).expand(x.shape[0])
        return torch.cat([self.model(x[i : i + 1], t[i : i + 1], labels[i : i + 1]) for i in range(x.shape[0])])


def dc_model() -> Callable[..., Tensor]:
    return SHAPES["image"].oracle.as_model("edm")


def cases() -> list[str]:
    grid = [f"{s}/{sm}/{sh}/{m}" for s in STRATEGIES for sm in SAMPLERS for sh in SHAPES for m in MODELS]
    return [*grid, *STOCHASTIC]


def run_case(
    name: str, parallel: bool, *, seed: int = 0, scale: float | None = None, poison: bool = False
) -> tuple[Tensor, dict[str, int]]:
    """Sample case ``name`` (``strategy/sampler/shape/model``); ``parallel``: through :func:`distributed.wrap`;
    ``poison``: the model returns NaN (so this process's forward raises)."""
    strategy_name, sampler, shape_name, model_name = name.split("/")
    shape = SHAPES[shape_name]
    tally = [0]  # rows evaluated by the model (and the weak model)
    oracle = shape.oracle.as_model(shape.prediction)
    model = (lambda x, t, labels: oracle(x, t, labels) * float("nan")) if poison else oracle
    native = Counting(model, model_name == "rowwise", tally)
    adapter = adapt(native, shape.prediction, layout=shape.layout)
    strategy = STRATEGIES[strategy_name]() if scale is None else gk.CFG(scale)
    weak = None
    if "weak" in strategy.models():  # another mixture with wider components as the weak model
        blurred = GaussianMixture.random(3, 2, shape.oracle.event_shape, spread=2.0, std=0.8, seed=99)
        weak = adapt(Counting(blurred.as_model(shape.prediction), model_name == "rowwise", tally), shape.prediction,
                     layout=shape.layout)  # fmt: skip
    b = shape.batch
    labels = torch.arange(b) % 3
    extra = {"negative": (labels + 1) % 3}
    den: GuidedDenoiser = gk.guided(
        adapter, strategy, labels, torch.full((b,), UNCOND), conditions=extra, weak_model=weak
    )
    if parallel:
        distributed.wrap(den)
    sigmas = default_schedule(adapter, STEPS)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(b, *shape.oracle.event_shape, generator=g, dtype=torch.float64)
    x = adapter.initial_x(x_T, sigmas[0])
    options = {}
    if sampler == "euler-ancestral":
        options["generator"] = [torch.Generator().manual_seed(100 + i) for i in range(b)]
    x = gk.samplers.get(sampler)(den, x, sigmas, **options)
    stats = {"model_rows": tally[0], "nfe": den.nfe, "uncond_steps": sum(r.uncond_used for r in den.records)}
    backend = den.engine.backend
    stats["rows"] = backend.rows if isinstance(backend, distributed.DistributedBackend) else tally[0]
    return adapter.final_x(x), stats


class ExtraRow(Backend):
    """A backend that ignores the batch it is handed (returns one row too many), as a pipeline's own call does."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    def models(self) -> frozenset[str]:
        return self.inner.models()

    def prediction(self, model: str) -> Any:
        return self.inner.prediction(model)

    def forward(self, x: Tensor, sigma: Tensor, branches: Any, conditions: Any) -> dict[str, Tensor]:
        out = self.inner.forward(x, sigma, branches, conditions)
        return {name: torch.cat([pred, pred[:1]]) for name, pred in out.items()}


def run_extra_row() -> None:
    den = gk.guided(adapt(dc_model(), "edm"), gk.CFG(3.0), torch.arange(3), torch.full((3,), UNCOND))
    den.engine.backend = ExtraRow(den.engine.backend)
    distributed.wrap(den)
    g = torch.Generator().manual_seed(0)  # the same noise on every rank (else the agreement check refuses)
    x = torch.randn(3, *SHAPES["image"].oracle.event_shape, dtype=torch.float64, generator=g) * 80
    gk.samplers.get("euler")(den, x, default_schedule(den.model, 2))


def main(out: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    results: dict[str, Any] = {"samples": {}, "stats": {}, "errors": {}}
    for name in cases():
        results["samples"][name], results["stats"][name] = run_case(name, parallel=True)
    disagreements = {"seed": {"seed": rank}, "strategy": {"scale": 3.0 + rank}, "failure": {"poison": rank == 1}}
    for what, kwargs in disagreements.items():
        try:
            run_case("cfg/euler/image/batched", parallel=True, **kwargs)
        except gk.GuidekitError as exc:
            results["errors"][what] = f"{type(exc).__name__}: {exc}"
    try:
        run_extra_row()
    except gk.GuidekitError as exc:
        results["errors"]["extra-row"] = f"{type(exc).__name__}: {exc}"
    den = gk.guided(adapt(dc_model(), "edm"), gk.CFG(3.0), torch.zeros(1), torch.zeros(1))
    try:
        distributed.wrap(distributed.wrap(den))
    except gk.ConfigError as exc:
        results["errors"]["twice"] = str(exc)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
