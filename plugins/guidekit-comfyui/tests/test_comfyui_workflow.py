"""The pack's example workflow (API-format JSON) executed through ComfyUI's node functions on the tiny model.

The checkpoint loader, text encoders and empty latent are stubbed with the tiny model, its two contexts and
an 8x8 latent (no weights or CLIP here); every other node on the way to ``SamplerCustomAdvanced`` is the
real one: guidekit's generated nodes and ComfyUI's ``KSamplerSelect``, ``BasicScheduler``, ``RandomNoise``.
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

WORKFLOW = Path(__file__).resolve().parents[1] / "docs" / "workflow_interval_apg.json"
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
