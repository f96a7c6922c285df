"""The example plugin (plugins/guidekit-example) through the *real* entry-point machinery.

Install it first: ``pip install -e ./plugins/guidekit-example``. Locally the tests skip with that hint
when it is missing; in CI (``CI`` set) a missing plugin is a failure, so the install step cannot be lost.
"""

from __future__ import annotations

import os

import importlib_metadata
import pytest
import torch

import guidekit as gk
from guidekit.registry import STRATEGIES, Registry
from guidekit.testing import check_strategy, make_pair

INSTALL = "pip install -e ./plugins/guidekit-example"


def _entry_point() -> importlib_metadata.EntryPoint | None:
    found = [ep for ep in importlib_metadata.entry_points(group="guidekit.strategies") if ep.name == "perp-cfg"]
    return found[0] if found else None


if _entry_point() is None:
    if os.environ.get("CI"):
        pytest.fail(f"the example plugin is not installed: run `{INSTALL}`", pytrace=False)
    pytest.skip(f"the example plugin is not installed: run `{INSTALL}`", allow_module_level=True)


def test_the_entry_point_is_declared_by_the_installed_package() -> None:
    ep = _entry_point()
    assert ep is not None and ep.value == "guidekit_example.perp_cfg:PerpCFG"
    assert ep.dist is not None and ep.dist.name == "guidekit-example"


def test_a_fresh_registry_finds_it_lazily_through_importlib_metadata() -> None:
    reg: Registry = Registry("guidekit.strategies", "strategy")  # the real entry_points provider
    cls = reg.get("perp-cfg")
    assert cls.__module__ == "guidekit_example.perp_cfg" and reg.origin("perp-cfg").startswith("plugin ")


def test_the_global_registry_lists_and_builds_it() -> None:
    assert "perp-cfg" in gk.strategies.names()
    strategy = gk.build({"name": "perp-cfg", "params": {"scale": 6.0}})
    assert type(strategy) is STRATEGIES.get("perp-cfg") and strategy.scale == 6.0
    assert gk.build(gk.to_spec(strategy).model_dump_json()) == strategy


def test_it_passes_the_shared_contract() -> None:
    check_strategy("perp-cfg")


def test_it_guides_orthogonally_to_the_unconditional_prediction() -> None:
    c, u = make_pair((2, 4, 6, 5), "correlated", seed=2)
    strategy = gk.build("perp-cfg")
    step = strategy(c, u) - c
    assert not torch.allclose(strategy(c, u), gk.CFG(strategy.scale)(c, u))
    dots = (step * u).flatten(1).sum(1)
    assert torch.allclose(dots, torch.zeros(2, dtype=torch.float64), atol=1e-9)
