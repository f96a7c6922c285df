"""An example guidekit plugin. Installing it registers the strategy ``"perp-cfg"`` through an entry point."""

from __future__ import annotations

from .perp_cfg import PerpCFG

__all__ = ["PerpCFG"]
