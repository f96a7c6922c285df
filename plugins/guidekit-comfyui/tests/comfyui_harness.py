"""Test setup of the ComfyUI pack: find and import ComfyUI as a library, build a tiny model through it.

ComfyUI is found through ``COMFYUI_PATH``, else ``../shared/vendor/ComfyUI`` relative to the repository root
(the vendored snapshot CI has). Where neither exists the tests skip, saying so.

torchvision: no wheel matches the local CPU torch 2.13.0, and ComfyUI imports only ``torchvision.transforms``
at module import. When torchvision is missing, :func:`import_comfy` installs an empty stand-in module for
that import (and prints that it did); nothing the tests run uses it.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import os
import sys
import types
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import torch

import guidekit as gk
from guidekit.registry import STRATEGIES

REPO = Path(__file__).resolve().parents[3]
FALLBACK = REPO.parent / "shared" / "vendor" / "ComfyUI"


def comfyui_path() -> Path | None:
    """``COMFYUI_PATH`` if set and present, else the vendored fallback if present, else ``None``."""
    env = os.environ.get("COMFYUI_PATH")
    for candidate in ([Path(env)] if env else []) + [FALLBACK]:
        if (candidate / "comfy" / "samplers.py").is_file():
            return candidate
    return None


INSTALL = 'pip install -e "./plugins/guidekit-comfyui[test]"'

SKIP_REASON = (
    f"ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout, or provide {FALLBACK} "
    f"(COMFYUI_PATH={os.environ.get('COMFYUI_PATH')!r})"
)


def require(comfyui: bool = True) -> None:
    """Skip the calling test module, with the reason, when the pack (or ComfyUI) is missing; in CI (``CI``
    set) fail instead, so that a lost install step or a missing ComfyUI cannot pass as skipped tests."""
    import importlib.util

    import pytest

    reason = None
    if importlib.util.find_spec("guidekit_comfyui") is None:
        reason = f"guidekit-comfyui is not installed: run `{INSTALL}`"
    elif comfyui and comfyui_path() is None:
        reason = SKIP_REASON
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def _stand_in_torchvision() -> None:
    with contextlib.suppress(ImportError):  # before the stand-in: transformers probes torchvision (needs a __spec__)
        import transformers  # noqa: F401
    try:
        import torchvision  # noqa: F401
    except Exception:
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")  # type: ignore[attr-defined]
        tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
        tv.transforms.__spec__ = importlib.machinery.ModuleSpec("torchvision.transforms", None)  # type: ignore[attr-defined]
        sys.modules["torchvision"], sys.modules["torchvision.transforms"] = tv, tv.transforms  # type: ignore[attr-defined]
        print("guidekit-comfyui tests: torchvision missing, installed a stand-in torchvision.transforms module")


@cache
def import_comfy() -> types.ModuleType:
    """Import ComfyUI (CPU mode) from :func:`comfyui_path`; returns ``comfy.samplers``."""
    path = comfyui_path()
    if path is None:
        raise RuntimeError(SKIP_REASON)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    _stand_in_torchvision()
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models

    return comfy.samplers


UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1],
    "transformer_depth": [1],
    "channel_mult": [1],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 32,
    "num_heads": 2,
    "transformer_depth_output": [1, 1],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
"""An SD1.x UNet config made very small: one level of 32 channels (one ResBlock and one transformer block with
self- and cross-attention), a transformer mid block and two output blocks."""


class Tiny(NamedTuple):
    """A tiny SD1.x model through ComfyUI's classes, and what to sample it with."""

    patcher: Any
    positive: list[list[Any]]
    negative: list[list[Any]]
    cond: torch.Tensor
    uncond: torch.Tensor


@cache
def tiny_model(seed: int = 0) -> Tiny:
    """``SD15`` config -> ``BaseModel`` -> ``ModelPatcher``, weights initialised with ``seed`` (ComfyUI's ops
    skip initialisation)."""
    import_comfy()
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(UNET))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            scale = 1.0 / fan_in**0.5 if p.ndim > 1 else 0.02
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if name.endswith("norm.weight") else 0.0))
    model.requires_grad_(False)
    patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    cond = torch.randn(1, 4, 32, generator=gen)
    uncond = torch.randn(1, 4, 32, generator=gen) * 0.3
    return Tiny(patcher, [[cond, {}]], [[uncond, {}]], cond, uncond)


WAN = {
    "image_model": "wan2.1",
    "model_type": "t2v",
    "dim": 32,
    "ffn_dim": 64,
    "freq_dim": 32,
    "text_dim": 16,
    "in_dim": 16,
    "out_dim": 16,
    "num_heads": 2,
    "num_layers": 2,
    "text_len": 8,
}
"""A Wan 2.1 text-to-video DiT made very small: 5D latents ``(b, c, t, h, w)``, a flow model (``CONST``)."""


@cache
def tiny_video(seed: int = 0) -> Tiny:
    """``WAN21_T2V`` config -> ``WAN21`` -> ``ModelPatcher``, weights initialised with ``seed``."""
    import_comfy()
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.WAN21_T2V(dict(WAN))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / p[0].numel() ** 0.5 if p.ndim > 1 else 0.02))
    model.requires_grad_(False)
    patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    cond = torch.randn(1, 8, 16, generator=gen)
    uncond = torch.randn(1, 8, 16, generator=gen) * 0.3
    return Tiny(patcher, [[cond, {}]], [[uncond, {}]], cond, uncond)


def schedule(steps: int = 4) -> torch.Tensor:
    """A float32 Karras-like schedule below the model's sigma_max (so ComfyUI's noise scaling is ``sigma·n``)."""
    from guidekit.ops.timesteps import karras_sigmas

    return karras_sigmas(steps, sigma_min=0.1, sigma_max=8.0).to(torch.float32)


def noise(batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread while inside (the tiny model is op-overhead bound: about 6x faster on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def example(name: str) -> gk.GuidanceStrategy:
    cls = STRATEGIES.get(name)
    return cls.contract_example()


def why_not(name: str) -> str | None:
    """Why the guider cannot run ``name`` (refused when sampling starts), or ``None``."""
    strategy = example(name)
    if strategy.sampler_coupled:
        return "sampler-coupled"  # re-noises inside the sampler update (CFG++, DPS)
    if strategy.models() != frozenset({"main"}):
        return "weak"  # AutoGuidance without its second model (test_autoguidance_with_a_weak_model_... runs it)
    if strategy.observers():
        return "attention maps"  # SAG, S-CFG: ComfyUI's forwards record none
    if strategy.perturbations():
        return "perturbation"  # layer selectors in ComfyUI's names: test_comfyui_perturbations runs these
    if strategy.reads_condition():
        return "condition"  # learned-weight reads class labels; ComfyUI's conditionings are embeddings (unknown row)
    return None
