"""The Guidekit Model Patch: a strategy inside ComfyUI's own sampling function (the KSampler path)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from comfyui_harness import Tiny, import_comfy, noise, one_thread, require, schedule, tiny_model

import guidekit as gk

require()

TOL = 2e-5


@pytest.fixture(scope="module")
def tiny() -> Iterator[Tiny]:
    import_comfy()
    with one_thread():
        yield tiny_model()


def _ksampler(model: Any, tiny: Tiny, sampler: str, cfg: float) -> torch.Tensor:
    """The KSampler path: ComfyUI's CFGGuider (what ``comfy.sample.sample`` builds) on the patched model."""
    import comfy.samplers

    n = noise()
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(tiny.positive, tiny.negative)
    guider.set_cfg(cfg)
    sampler_object = comfy.samplers.sampler_object(sampler)
    return guider.sample(n, torch.zeros_like(n), sampler_object, schedule(), disable_pbar=True, seed=0)


def _guider(tiny: Tiny, strategy: gk.GuidanceStrategy, sampler: str) -> torch.Tensor:
    import comfy.samplers
    from guidekit_comfyui.guider import GuidekitComfyGuider

    n = noise()
    guider = GuidekitComfyGuider(tiny.patcher, strategy)
    guider.set_conds(tiny.positive, tiny.negative)
    return guider.sample(n, torch.zeros_like(n), comfy.samplers.sampler_object(sampler), schedule(), disable_pbar=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / float(b.abs().max())


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
def test_patch_equals_the_guider(tiny: Tiny, sampler: str) -> None:
    from guidekit_comfyui.patch import GuidekitModelPatch

    strategy = gk.Interval(gk.APG(scale=4.0, momentum=-0.5, norm_threshold=5.0), sigma_lo=0.5, sigma_hi=3.0)
    patch = GuidekitModelPatch(strategy)
    out = _ksampler(patch.apply(tiny.patcher), tiny, sampler, cfg=7.0)
    assert _rel(out, _guider(tiny, strategy, sampler)) < TOL
    assert patch.engine is not None and patch.engine.nfe == sum(len(c) for c in patch.calls)
    assert ("cond",) in patch.calls  # outside the interval only the positive conditioning ran


def test_cfg_1_does_not_drop_the_branch_the_strategy_needs(tiny: Tiny) -> None:
    from guidekit_comfyui.patch import GuidekitModelPatch

    strategy = gk.CFG(3.0)
    patch = GuidekitModelPatch(strategy)
    out = _ksampler(patch.apply(tiny.patcher), tiny, "euler", cfg=1.0)
    assert _rel(out, _guider(tiny, strategy, "euler")) < TOL
    assert all(c == ("cond", "uncond") for c in patch.calls)


def test_other_packs_hooks_still_apply(tiny: Tiny) -> None:
    """Another node's calc-cond-batch function is chained, its pre- and post-cfg functions keep running."""
    import comfy.samplers
    from guidekit_comfyui.patch import GuidekitModelPatch

    seen: dict[str, int] = {"calc": 0, "post": 0}

    def their_calc(args: dict[str, Any]) -> list[torch.Tensor]:
        seen["calc"] += 1
        return comfy.samplers.calc_cond_batch(
            args["model"], args["conds"], args["input"], args["sigma"], args["model_options"]
        )

    def their_post(args: dict[str, Any]) -> torch.Tensor:
        seen["post"] += 1
        return args["denoised"] * 0.5

    theirs = tiny.patcher.clone()
    theirs.set_model_sampler_calc_cond_batch_function(their_calc)
    theirs.set_model_sampler_post_cfg_function(their_post)
    strategy = gk.CFG(3.0)
    patch = GuidekitModelPatch(strategy)
    both = _ksampler(patch.apply(theirs), tiny, "euler", cfg=3.0)
    evaluations = len(schedule()) - 1
    assert seen == {"calc": evaluations, "post": evaluations}

    # the same halving applied to the guider's x0 by hand, to check both really applied
    ours_only = GuidekitModelPatch(strategy).apply(tiny.patcher)
    ours_only.set_model_sampler_post_cfg_function(lambda args: args["denoised"] * 0.5)
    assert torch.equal(both, _ksampler(ours_only, tiny, "euler", cfg=3.0))
    assert _rel(both, _ksampler(GuidekitModelPatch(strategy).apply(tiny.patcher), tiny, "euler", 3.0)) > 1e-2


def test_a_taken_cfg_function_slot_is_refused_by_name(tiny: Tiny) -> None:
    from guidekit_comfyui.nodes import GuidekitModelPatchNode, strategy_node
    from guidekit_comfyui.strategy import NodeInputError

    def their_cfg(args: dict[str, Any]) -> torch.Tensor:
        return args["cond"]

    theirs = tiny.patcher.clone()
    theirs.set_model_sampler_cfg_function(their_cfg)
    (cfg,) = strategy_node("cfg")().make(scale=2.0)
    with pytest.raises(NodeInputError, match=r"Guidekit Model Patch: model: .*sampler_cfg_function.*their_cfg"):
        GuidekitModelPatchNode().patch(theirs, cfg)
    (patched,) = GuidekitModelPatchNode().patch(tiny.patcher, cfg)
    with pytest.raises(NodeInputError, match="sampler_cfg_function"):
        GuidekitModelPatchNode().patch(patched, cfg)
