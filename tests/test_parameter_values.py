"""Values a strategy cannot use are refused at construction, naming the argument, the range and the value
(issue 18, defect 10)."""

from __future__ import annotations

import pytest

import guidekit as gk
from guidekit.errors import ConfigError


@pytest.mark.parametrize("cls", [gk.CFG, gk.AutoGuidance])
@pytest.mark.parametrize("flag", [True, False])
def test_a_bool_is_not_a_cfg_scale(cls: type[gk.GuidanceStrategy], flag: bool) -> None:
    with pytest.raises(ConfigError, match=rf"scale: expected a finite number, got {flag}"):
        cls(flag)
    with pytest.raises(ConfigError, match=r"spec\[cfg\]\.scale"):
        gk.build({"name": "cfg", "params": {"scale": flag}})


@pytest.mark.parametrize(("lam", "message"), [(5.0, r"<= 1\.0, got 5\.0"), (-0.1, r">= 0\.0, got -0\.1")])
def test_cfgpp_lambda_stays_in_its_documented_range(lam: float, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"scale: expected a number {message}"):
        gk.CFGPlusPlus(lam)
    with pytest.raises(ConfigError, match=r"spec\[cfg\+\+\]: scale: expected a number"):
        gk.build({"name": "cfg++", "params": {"scale": lam}})
    assert gk.CFGPlusPlus(0.0).scale == 0.0 and gk.CFGPlusPlus(1.0).scale == 1.0


@pytest.mark.parametrize("momentum", [5.0, 1.0, -1.0, -3.0])
def test_apg_momentum_is_refused_where_the_buffer_diverges(momentum: float) -> None:
    with pytest.raises(ConfigError, match=rf"momentum: expected a number with \|momentum\| < 1 .*got {momentum}"):
        gk.APG(momentum=momentum)


@pytest.mark.parametrize("momentum", [-0.99, -0.5, 0.0, 0.75])
def test_apg_momentum_inside_the_unit_interval_is_kept(momentum: float) -> None:
    assert gk.APG(momentum=momentum).momentum == momentum


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma_lo": float("nan")}, r"sigma_lo: expected a finite number >= 0, got nan"),
        ({"sigma_hi": float("nan")}, r"sigma_hi: expected a finite number >= sigma_lo \(0\.28\).*got nan"),
    ],
)
def test_a_nan_sigma_bound_is_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        gk.Interval(gk.CFG(), **kwargs)
