"""``generate`` on one pipeline from several threads: each call gets its own result, nothing stays patched."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

import guidekit as gk

pytest.importorskip("diffusers")
from guidekit.integrations.diffusers import generate
from guidekit.integrations.diffusers.tiny import tiny_pipeline

pytestmark = pytest.mark.diffusers


def run(pipe: Any, kw: dict[str, Any], scale: float) -> torch.Tensor:
    latents = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(5))
    out = generate(
        pipe, gk.CFG(scale), num_inference_steps=6, latents=latents, negative_prompt="", output_type="latent", **kw
    )
    return out.images


def test_threads_sharing_a_pipeline_each_get_their_own_result_and_leave_it_unpatched():
    pipe, kw = tiny_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    scales = [1.5, 3.0, 6.0, 9.0]
    expected = {s: run(pipe, kw, s) for s in scales}
    results: dict[float, torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(scales))

    def worker(scale: float) -> None:
        try:
            start.wait(5)
            for _ in range(3):
                results[scale] = run(pipe, kw, scale)
                assert torch.equal(results[scale], expected[scale]), scale
        except BaseException as exc:  # reported below, with the scale
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in scales]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert "forward" not in pipe.unet.__dict__  # no interceptor left behind
    latents = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(5))
    plain = pipe(num_inference_steps=6, latents=latents, output_type="latent", guidance_scale=3.0, **kw).images
    assert torch.isfinite(plain).all()  # the pipeline's own call works again


def test_an_interceptor_left_behind_is_refused_by_name():
    pipe, kw = tiny_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    stray = pipe.unet.forward

    def leftover(*args: Any, **kwargs: Any) -> Any:
        return stray(*args, **kwargs)

    leftover.__guidekit_interceptor__ = True  # type: ignore[attr-defined]
    pipe.unet.forward = leftover
    with pytest.raises(gk.GuidekitError, match=r"pipe: expected UNet2DConditionModel\.forward unpatched"):
        run(pipe, kw, 3.0)
