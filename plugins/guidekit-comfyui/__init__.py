"""Entry point when this folder is copied (or cloned) into ComfyUI's ``custom_nodes``.

ComfyUI imports ``custom_nodes/<folder>/__init__.py`` and reads ``NODE_CLASS_MAPPINGS``. Installed with
pip (``pip install ./plugins/guidekit-comfyui``), the same mappings come from ``guidekit_comfyui``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

_SRC = str(Path(__file__).resolve().parent / "src")
if importlib.util.find_spec("guidekit_comfyui") is None and _SRC not in sys.path:
    sys.path.insert(0, _SRC)

_pack = importlib.import_module("guidekit_comfyui")
NODE_CLASS_MAPPINGS = _pack.NODE_CLASS_MAPPINGS
NODE_DISPLAY_NAME_MAPPINGS = _pack.NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
