"""A guidekit strategy installed on a ComfyUI model, for plain ``KSampler`` users (no custom guider).

ComfyUI's ``sampling_function`` runs, per model evaluation: the conditionings (``calc_cond_batch``, or the
one ``sampler_calc_cond_batch_function``), the list of pre-cfg functions, the one ``sampler_cfg_function``,
the list of post-cfg functions. The patch takes part as follows:

* **calc-cond-batch** (one slot, *chained*): asks the engine's plan which conditionings this evaluation
  needs and runs only those, through the function another node put there before (if any) or ComfyUI's
  ``calc_cond_batch``. A skipped negative branch is handed on as the positive prediction (never read by the
  strategy).
* **cfg function** (one slot, *refused if taken*): completes the evaluation through the engine with the
  predictions as the pre-cfg functions left them. A second cfg function cannot be chained meaningfully, so
  a model that already has one is refused with a message naming the slot; other nodes' pre- and post-cfg
  functions (lists) keep applying, in their order.
* ``disable_cfg1_optimization``: set, so a KSampler at ``cfg = 1`` does not silently drop the negative branch
  the strategy needs. The KSampler's cfg value is not used: the strategy carries its scale.
* a ``SAMPLER_SAMPLE`` wrapper starts a fresh engine per run (schedule, sampler, step clock) and wraps the
  sampler's callback, so state is committed once per step as under the Guidekit Guider.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import comfy.patcher_extension
import comfy.samplers
import torch
from torch import Tensor

from guidekit.engine import Engine, Pending
from guidekit.errors import ConfigError, GuidekitError
from guidekit.strategies.base import GuidanceStrategy

from .guider import ComfyBranches, StepClock, start_run, to_edm
from .strategy import StrategyRef, as_ref

__all__ = ["WRAPPER_KEY", "GuidekitModelPatch"]

WRAPPER_KEY = "guidekit"
_NAMES = ("cond", "uncond")


class _PatchBackend(ComfyBranches):
    who = "the Guidekit model patch"


class GuidekitModelPatch:
    """The hooks that run ``strategy`` inside ComfyUI's own ``sampling_function`` (see the module docstring).

    Args:
        strategy: a :class:`StrategyRef` (a strategy node's output), a guidekit strategy or its spec.
    """

    def __init__(self, strategy: StrategyRef | GuidanceStrategy | dict[str, Any]) -> None:
        self.strategy_ref = as_ref(strategy, "Guidekit Model Patch", "strategy")
        self.backend = _PatchBackend()
        self.engine: Engine | None = None
        self.clock: StepClock | None = None
        self._pending: Pending | None = None
        self._previous: Callable[[dict[str, Any]], list[Tensor]] | None = None
        self.calls: list[tuple[str, ...]] = []
        """The conditionings run per evaluation (tests count rows with it)."""

    def apply(self, model: Any) -> Any:
        """A clone of ComfyUI's ``MODEL`` with the strategy installed; refuses a taken cfg-function slot."""
        options = model.model_options
        taken = options.get("sampler_cfg_function")
        if taken is not None:
            raise ConfigError(
                "model: expected a model without a sampler_cfg_function, since ComfyUI holds one and the Guidekit "
                f"patch needs it; got one set by another node ({getattr(taken, '__qualname__', type(taken).__name__)})"
                " - apply the Guidekit patch instead of that node, or use the Guidekit Guider"
            )
        if model.get_wrappers(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY):
            raise ConfigError("model: expected a model without a Guidekit patch, got one patched already")
        patched = model.clone()
        self._previous = options.get("sampler_calc_cond_batch_function")
        patched.set_model_sampler_calc_cond_batch_function(self._calc_cond_batch)
        patched.set_model_sampler_cfg_function(self._cfg_function, disable_cfg1_optimization=True)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY, self._run)
        return patched

    # -- the hooks -------------------------------------------------------------------------------------
    def _run(self, executor: Any, guider: Any, sigmas: Tensor, extra_args: Any, callback: Any, *rest: Any) -> Any:
        model_sampling = guider.inner_model.model_sampling
        self.engine, self.clock = start_run(self.strategy_ref, self.backend, executor.class_obj, sigmas, model_sampling)
        self.calls.clear()
        clock = self.clock

        def on_step(step: int, x0: Tensor, x: Tensor, total: int) -> None:
            clock.on_callback(step)
            if callback is not None:
                callback(step, x0, x, total)

        return executor(guider, sigmas, extra_args, on_step, *rest)

    def _calc_cond_batch(self, args: dict[str, Any]) -> list[Tensor]:
        if self.engine is None or self.clock is None:
            raise GuidekitError("model patch: expected a sampler run (KSampler, SamplerCustom) before an evaluation")
        x, timestep, model = args["input"], args["sigma"], args["model"]
        x_edm, sigma = to_edm(model.model_sampling, x, timestep)
        pending = self.engine.plan(x_edm, sigma, self.clock.next(float(sigma.reshape(-1)[0])))
        names = [b.name for b in pending.plan]
        conds = dict(zip(_NAMES, args["conds"], strict=True))
        needed = []
        for name in names:
            if conds.get(name) is None:
                what = "positive" if name == "cond" else "negative"
                raise ConfigError(f"{what}: expected a conditioning, since the strategy evaluates it here; got None")
            needed.append(conds[name])
        self.calls.append(tuple(names))
        if not needed:
            out: list[Tensor] = []
        elif self._previous is not None:
            out = self._previous({**args, "conds": needed})
        else:
            out = comfy.samplers.calc_cond_batch(model, needed, x, timestep, args["model_options"])
        preds = dict(zip(names, out, strict=True))
        self._pending = pending
        cond = preds.get("cond", torch.zeros_like(x))
        return [cond, preds.get("uncond", cond)]

    def _cfg_function(self, args: dict[str, Any]) -> Tensor:
        pending, self._pending = self._pending, None
        if pending is None or self.engine is None:
            raise GuidekitError("model patch: expected the calc-cond-batch hook to plan this evaluation, got no plan")
        given = {"cond": args["cond_denoised"], "uncond": args["uncond_denoised"]}
        out = self.engine.complete(pending, {b.name: given[b.name] for b in pending.plan})
        return args["input"] - out.guided
