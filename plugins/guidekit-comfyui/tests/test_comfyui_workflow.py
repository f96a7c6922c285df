"""The pack's example workflows (API-format JSON) executed through ComfyUI's node functions on the tiny model.

The checkpoint loader and text encoders are stubbed with the tiny model and its two contexts (no weights or
CLIP here), the empty latent with an 8x8 one; every other node on the way to the sampler is the real one:
guidekit's generated nodes and ComfyUI's ``KSamplerSelect``, ``BasicScheduler``, ``RandomNoise``, ``KSampler``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from comfyui_harness import import_comfy, one_thread, require, tiny_model

import guidekit as gk
from guidekit.registry import SAMPLERS
from guidekit.samplers import EDMModel

require()

DOCS = Path(__file__).resolve().parents[1] / "docs"
WORKFLOW = DOCS / "workflow_interval_apg.json"
STEPS = 4  # the example says 20; fewer keep the test fast


def _run(workflow: dict[str, Any], output: str, done: dict[str, tuple[Any, ...]], nodes: dict[str, type]) -> Any:
    """Evaluate ``output`` of an API-format workflow: links ``[node, index]``; ``done`` holds the outputs so far
    (the stubs to start with), by node id."""

    def value(node_id: str) -> tuple[Any, ...]:
        if node_id not in done:
            node = workflow[node_id]
            cls = nodes[node["class_type"]]
            kwargs = {
                k: value(v[0])[v[1]] if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) else v
                for k, v in node["inputs"].items()
            }
            done[node_id] = getattr(cls(), cls.FUNCTION)(**kwargs)
        return done[node_id]

    return value(output)


def test_example_workflow_runs_end_to_end_and_equals_the_native_engine() -> None:
    import_comfy()
    import comfy_extras.nodes_custom_sampler as custom
    from guidekit_comfyui import NODE_CLASS_MAPPINGS

    workflow = json.loads(WORKFLOW.read_text())
    workflow["9"]["inputs"]["steps"] = STEPS
    tiny = tiny_model()
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    stubs: dict[str, tuple[Any, ...]] = {
        "1": (tiny.patcher, None, None),
        "2": (tiny.positive,),
        "3": (tiny.negative,),
        "11": (latent,),
    }
    nodes = {**custom.NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS}
    with one_thread():
        out, _ = _run(workflow, "12", stubs, nodes)
        sigmas = _run(workflow, "9", stubs, nodes)[0]
        guider = _run(workflow, "7", stubs, nodes)[0]

        # the same run through guidekit's own engine and Heun sampler
        strategy = gk.Interval.from_fractions(gk.Rescale(gk.APG(7.5, 0.0, 15.0, -0.5), 0.7), 0.0, 0.75, sigmas.double())
        model = tiny.patcher.model
        adapter = EDMModel(lambda x, sigma, cond: model.apply_model(x, sigma, c_crossattn=cond), prediction="x0")
        noise = custom.Noise_RandomNoise(42).generate_noise(latent)
        x_T = model.model_sampling.noise_scaling(sigmas[0], noise, latent["samples"], max_denoise=True)
        denoiser = gk.guided(adapter, strategy, tiny.cond, tiny.uncond)
        native = model.process_latent_out(SAMPLERS.get("heun")(denoiser, x_T, sigmas.double()))
    err = float((out["samples"] - native).abs().max()) / float(native.abs().max())
    assert err < 2e-5, err
    assert guider.engine.nfe == denoiser.nfe
    assert [r.uncond_used for r in guider.engine.records] == [True, True, True, False]


def test_ksampler_workflow_with_the_model_patch_equals_the_guider() -> None:
    """KSampler at cfg 1 on the patched model: Adaptive Guidance still runs the negative branch until it switches."""
    import_comfy()
    import comfy.sample
    import comfy.samplers
    import nodes as comfy_nodes
    from guidekit_comfyui import NODE_CLASS_MAPPINGS
    from guidekit_comfyui.guider import GuidekitComfyGuider

    workflow = json.loads((DOCS / "workflow_ksampler_patch.json").read_text())
    workflow["8"]["inputs"]["steps"] = STEPS
    workflow["7"]["inputs"].update(width=64, height=64)  # an 8x8 latent
    tiny = tiny_model()
    stubs: dict[str, tuple[Any, ...]] = {"1": (tiny.patcher, None, None), "2": (tiny.positive,), "3": (tiny.negative,)}
    classes = {**comfy_nodes.NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS}
    with one_thread():
        done = dict(stubs)
        (out,) = _run(workflow, "8", done, classes)
        strategy = done["5"][0]
        latent = done["7"][0]["samples"]
        model_sampling = tiny.patcher.model.model_sampling
        sigmas = comfy.samplers.calculate_sigmas(model_sampling, "karras", STEPS)
        guider = GuidekitComfyGuider(tiny.patcher, strategy)
        guider.set_conds(tiny.positive, tiny.negative)
        noise = comfy.sample.prepare_noise(latent, 7)
        sampler = comfy.samplers.sampler_object("heun")
        expected = guider.sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=7)
    err = float((out["samples"] - expected).abs().max()) / float(expected.abs().max())
    assert err < 2e-5, err
    assert guider.engine.records[0].uncond_used
