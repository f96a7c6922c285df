"""guidekit strategies as ComfyUI nodes (GPL-3.0: this package imports ComfyUI at run time).

``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS`` are generated from guidekit's strategy registry
when ComfyUI imports the pack (:func:`guidekit_comfyui.nodes.node_mappings`): a strategy a plugin registers
gets its node too. The guider (``guidekit_comfyui.guider``) imports ComfyUI; the node and strategy modules
do not.
"""

from __future__ import annotations

from .nodes import STRATEGY_TYPE, node_mappings
from .strategy import NodeInputError, StrategyRef

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "STRATEGY_TYPE", "NodeInputError", "StrategyRef"]

NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = node_mappings()
