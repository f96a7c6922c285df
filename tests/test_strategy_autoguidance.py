"""AutoGuidance (``gk.AutoGuidance``), through the real guided loop on the exact Gaussian-mixture oracle:
Karras et al.'s ``D_weak + w (D - D_weak)`` with a second network, and refused (also inside combinators)
without one."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loop_helpers import GM, LABELS, UNCONDS, x_T
from torch import Tensor

import guidekit as gk
from guidekit.oracle import GaussianMixture

WEAK = GaussianMixture(GM.means.reshape(3, 2, 2, 3, 3) * 0.8, 0.7)  # a "bad version": blurrier, shrunk


@settings(max_examples=6)
@given(st.floats(1.0, 4.0), st.integers(0, 99))
def test_autoguidance_is_karras_rule_with_a_second_network(w, seed):
    sigmas = gk.samplers.karras_sigmas(8, 0.01, 40.0)

    def reference(x: Tensor, sigma: Tensor, info: object) -> Tensor:
        main, weak = GM.predict(x, sigma, LABELS, "x0"), WEAK.predict(x, sigma, LABELS, "x0")
        return weak + w * (main - weak)  # eq. 2, same condition for both networks

    start = x_T(seed) * 40.0
    expected = gk.samplers.sample_euler(reference, start, sigmas)
    adapter = gk.samplers.adapt(GM.as_model("edm"), "edm")  # EDM models take sigma as is: exact
    weak = gk.samplers.adapt(WEAK.as_model("edm"), "edm")
    den = gk.guided(adapter, gk.AutoGuidance(w), LABELS, weak_model=weak)
    ours = gk.samplers.sample_euler(den, start, sigmas)
    assert torch.allclose(ours, expected, rtol=0, atol=1e-10)
    per_step = 2 if w != 1.0 else 1  # two networks, two forwards; w = 1 is the main model alone
    assert den.nfe == den.forwards == 8 * per_step


def test_autoguidance_needs_a_weak_model():
    adapter = gk.samplers.adapt(GM.as_model("eps"), "eps")
    for strategy in (gk.AutoGuidance(2.0), gk.Interval(gk.AutoGuidance(2.0)), gk.TVCFG(gk.AutoGuidance(2.0))):
        with pytest.raises(gk.ConfigError, match=r"weak_model: expected the weak model"):
            gk.guided(adapter, strategy, LABELS, UNCONDS)
