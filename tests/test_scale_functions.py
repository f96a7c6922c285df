"""Scale functions come from a registry, never from an import path in a config (issue 18, defect 6)."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import pytest
import torch

import guidekit as gk
from guidekit.errors import ConfigError
from guidekit.ops.schedules import sigma_bump
from guidekit.registry import SCALE_FUNCTIONS
from guidekit.testing import make_pair

PAIR = make_pair((2, 3, 4, 4), "correlated", 0)
Register = Callable[[str, Callable[[float], float]], None]


def ctx(sigma: float = 1.0) -> gk.GuidanceContext:
    return gk.GuidanceContext(sigma=torch.full((2,), sigma), step=1, num_steps=4)


@pytest.mark.parametrize("path", ["sys:exit", "time:sleep", "os:abort", "os.system", "gk_never_imported:f"])
def test_a_config_cannot_name_an_arbitrary_callable_and_imports_nothing(path: str) -> None:
    spec = {"name": "scale-function", "params": {"function": path}}
    with pytest.raises(
        ConfigError, match=rf"function: expected a registered scale function \(.*sigma-bump.*\).*got '{path}'"
    ):
        gk.build(spec)
    assert "gk_never_imported" not in sys.modules


def test_builtin_names_and_the_paths_of_registered_functions_resolve() -> None:
    bump = gk.build({"name": "scale-function", "params": {"function": "sigma-bump"}})
    for ref in ("guidekit.scale_schedules:sigma_bump", f"{sigma_bump.__module__}:sigma_bump"):
        same = gk.ScaleFunction(ref)  # configs saved with the function's path still build
        assert torch.equal(same(*PAIR, ctx(2.0)), bump(*PAIR, ctx(2.0)))
    assert gk.build(gk.to_spec(bump).model_dump_json()) == bump


def test_a_users_function_registers_with_the_decorator() -> None:
    @SCALE_FUNCTIONS.register("test-halve")
    def halve(sigma: float) -> float:
        return sigma / 2

    try:
        s = gk.build({"name": "scale-function", "params": {"function": "test-halve"}})
        c, u = PAIR
        assert torch.equal(s(c, u, ctx(6.0)), gk.CFG(3.0)(c, u))
        assert gk.ScaleFunction(f"{halve.__module__}:{halve.__qualname__}")._fn is halve  # its path, once registered
    finally:
        SCALE_FUNCTIONS.unregister("test-halve")


def test_only_functions_can_be_registered() -> None:
    with pytest.raises(
        ConfigError, match=r"scale function 'test-three': expected a function float -> float, got int 3"
    ):
        SCALE_FUNCTIONS.register("test-three", 3)
    with pytest.raises(ConfigError, match=r"got the strategy class CFG"):
        SCALE_FUNCTIONS.register("test-cfg", gk.CFG)


def test_a_function_calling_sys_exit_raises_an_error_naming_it(scale_functions: Register) -> None:
    scale_functions("test-exits", sys.exit)
    with pytest.raises(ConfigError, match=r"function: test-exits\(sigma=2\.0\) raised SystemExit: 2\.0"):
        gk.ScaleFunction("test-exits")(*PAIR, ctx(2.0))


def test_a_keyboard_interrupt_in_the_function_still_interrupts(scale_functions: Register) -> None:
    def interrupted(sigma: float) -> float:
        raise KeyboardInterrupt

    scale_functions("test-interrupted", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gk.ScaleFunction("test-interrupted")(*PAIR, ctx())


def test_registered_math_functions_keep_their_paths(scale_functions: Register) -> None:
    scale_functions("test-cos", math.cos)
    for ref in ("test-cos", "math:cos", "math.cos"):
        assert gk.ScaleFunction(ref, variable="progress")._fn is math.cos


def test_guidekit_list_shows_the_scale_functions(capsys: pytest.CaptureFixture[str]) -> None:
    from guidekit.cli import main

    assert main(["list", "scale-functions"]) == 0
    out = capsys.readouterr().out
    assert "scale-functions (1):" in out and "sigma-bump" in out
