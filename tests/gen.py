"""Hypothesis generators for the test-suite: re-exported from :mod:`guidekit.testing` (which plugins use too)."""

from __future__ import annotations

from guidekit.testing import KINDS, LAYOUTS, examples, layouts, make_pair, pred_pairs, shapes, sigmas

__all__ = ["KINDS", "LAYOUTS", "examples", "layouts", "make_pair", "pred_pairs", "shapes", "sigmas"]
