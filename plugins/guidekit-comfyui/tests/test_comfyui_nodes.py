"""Nodes generated from the registry (no ComfyUI needed: building a strategy never imports it)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any, ClassVar

import pytest
from comfyui_harness import require
from torch import Tensor

import guidekit as gk
from guidekit.config import params_model
from guidekit.context import StrategySpace
from guidekit.registry import STRATEGIES

require(comfyui=False)

from guidekit_comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, NodeInputError, StrategyRef  # noqa: E402
from guidekit_comfyui.nodes import STRATEGY_TYPE, IntervalPercentNode, node_mappings, strategy_node  # noqa: E402

PACK = Path(__file__).resolve().parents[1]


def _defaults(node: type) -> dict[str, Any]:
    spec = node.INPUT_TYPES()
    return {k: v[1]["default"] for k, v in spec["required"].items() if len(v) > 1 and "default" in v[1]}


def test_one_node_per_registered_strategy_plugins_included() -> None:
    names = STRATEGIES.names()
    assert {f"Guidekit_{n}" for n in names} <= set(NODE_CLASS_MAPPINGS)
    assert "Guidekit_perp-cfg" in NODE_CLASS_MAPPINGS  # the example plugin's entry point
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS)
    assert {"GuidekitGuider", "GuidekitIntervalPercent"} <= set(NODE_CLASS_MAPPINGS)


def test_registering_a_strategy_adds_a_node() -> None:
    @dataclasses.dataclass(frozen=True)
    class Doubler(gk.GuidanceStrategy):
        """CFG at twice the scale.

        Args:
            scale: half the CFG scale.
        """

        space: ClassVar[StrategySpace] = "any"
        scale: float = 1.5

        def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: gk.GuidanceContext) -> Tensor:
            return pred_uncond + 2 * self.scale * (pred_cond - pred_uncond)

    STRATEGIES.register("test-doubler", Doubler)
    try:
        classes, names = node_mappings()
        node = classes["Guidekit_test-doubler"]
        assert names["Guidekit_test-doubler"] == "Guidekit Doubler (test-doubler)"
        widget = node.INPUT_TYPES()["required"]["scale"]
        assert widget[0] == "FLOAT" and widget[1]["default"] == 1.5 and widget[1]["tooltip"] == "half the CFG scale."
        (ref,) = node().make(scale=2.0)
        assert ref.resolve(None) == Doubler(2.0)
    finally:
        STRATEGIES.unregister("test-doubler")
    assert "Guidekit_test-doubler" not in node_mappings()[0]


@pytest.mark.parametrize("name", [n for n in STRATEGIES.names() if n != "scale-function"])
def test_default_widgets_build_the_strategy_with_its_defaults(name: str) -> None:
    node = strategy_node(name)
    kwargs = _defaults(node)
    (ref,) = node().make(**kwargs)
    assert isinstance(ref, StrategyRef)
    assert ref.resolve(None) == STRATEGIES.get(name)()


def test_widget_types_come_from_the_params_model() -> None:
    spec = strategy_node("cfg-zero-star").INPUT_TYPES()["required"]
    assert spec["scale"][0] == "FLOAT" and spec["zero_init_steps"][0] == "INT" and spec["scaled_shift"][0] == "BOOLEAN"
    ramp = strategy_node("ramp").INPUT_TYPES()["required"]
    assert ramp["shape"][0] == ["linear", "cosine"] and ramp["inner"][0] == STRATEGY_TYPE
    assert ramp["min_scale"][0] == "STRING" and ramp["min_scale"][1]["default"] == ""
    assert set(strategy_node("apg").INPUT_TYPES()["required"]) == set(params_model(gk.APG).model_fields)
    assert "momentum" in strategy_node("apg").INPUT_TYPES()["required"]["momentum"][1]["tooltip"] or True
    assert strategy_node("interval").CATEGORY.endswith("combinators")
    assert strategy_node("cfg").CATEGORY.endswith("strategies")


def test_combinators_take_a_strategy_input() -> None:
    (apg,) = strategy_node("apg")().make(scale=5.0, eta=0.0, norm_threshold=10.0, momentum=-0.5)
    (rescaled,) = strategy_node("rescale")().make(inner=apg, phi=0.5)
    (window,) = strategy_node("interval")().make(inner=rescaled, sigma_lo=0.5, sigma_hi="")
    assert window.resolve(None) == gk.Interval(gk.Rescale(gk.APG(5.0, 0.0, 10.0, -0.5), 0.5), 0.5, None)


def test_bad_inputs_name_the_node_and_the_field() -> None:
    with pytest.raises(NodeInputError, match=r"Guidekit APG \(apg\).*momentum: expected .*\|momentum\| < 1"):
        strategy_node("apg")().make(scale=5.0, eta=0.0, norm_threshold=10.0, momentum=3.0)
    with pytest.raises(NodeInputError, match=r"Guidekit Interval \(interval\).*sigma_hi: expected a number"):
        strategy_node("interval")().make(sigma_lo=0.5, sigma_hi="high")
    with pytest.raises(NodeInputError, match=r"Guidekit FDG \(fdg\).*scales: expected comma-separated numbers"):
        strategy_node("fdg")().make(scales="1, x", parallel_weights="")
    with pytest.raises(NodeInputError, match=r"Guidekit Rescale \(rescale\).*inner: expected a GUIDEKIT_STRATEGY"):
        strategy_node("rescale")().make(inner=3, phi=0.5)
    with pytest.raises(NodeInputError, match=r"Guidekit Guider.*unknown strategy 'nope'"):
        from guidekit_comfyui.strategy import as_ref

        as_ref("nope", "Guidekit Guider", "strategy")
    with pytest.raises(NodeInputError, match=r"Interval \(percent of steps\).*end_percent: expected >= start_percent"):
        (cfg,) = strategy_node("cfg")().make(scale=2.0)
        IntervalPercentNode().make(cfg, 0.5, 0.25)


def test_percent_window_needs_the_schedule() -> None:
    (cfg,) = strategy_node("cfg")().make(scale=2.0)
    (window,) = IntervalPercentNode().make(cfg, 0.25, 0.75)
    (outer,) = strategy_node("rescale")().make(inner=window, phi=0.5)
    assert window.needs_schedule and outer.needs_schedule
    with pytest.raises(gk.GuidekitError, match="sigmas"):
        outer.resolve(None)
    sigmas = gk.ops.timesteps.karras_sigmas(4, 0.1, 8.0)
    built = outer.resolve(sigmas)
    assert built == gk.Rescale(gk.Interval.from_fractions(gk.CFG(2.0), 0.25, 0.75, sigmas), 0.5)


def test_custom_nodes_folder_entry_point() -> None:
    spec = importlib.util.spec_from_file_location("guidekit_comfyui_pack", PACK / "__init__.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert set(module.NODE_CLASS_MAPPINGS) == set(NODE_CLASS_MAPPINGS)


def test_comfyui_is_found_through_the_environment_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import comfyui_harness

    (tmp_path / "comfy").mkdir()
    (tmp_path / "comfy" / "samplers.py").write_text("")
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    assert comfyui_harness.comfyui_path() == tmp_path
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "missing"))
    fallback = comfyui_harness.FALLBACK
    assert comfyui_harness.comfyui_path() == (fallback if (fallback / "comfy" / "samplers.py").is_file() else None)
