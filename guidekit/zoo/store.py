"""Checkpoints of the embedded models: safetensors weights plus a JSON record beside them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["CHECKPOINT_DIR", "read_record", "read_weights", "require_checkpoint", "write_checkpoint"]

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"


def _paths(name: str, directory: Path | str | None) -> tuple[Path, Path]:
    base = Path(directory) if directory is not None else CHECKPOINT_DIR
    return base / f"{name}.safetensors", base / f"{name}.json"


def write_checkpoint(module: nn.Module, name: str, record: dict[str, Any], directory: Path | str | None = None) -> Path:
    """Save weights as ``<name>.safetensors`` and ``record`` as ``<name>.json``; return the weights path.

    Both are written beside their final names first and moved into place only when both are complete, so
    an interrupted or failed save leaves the earlier checkpoint (or none), never a half-written file.
    """
    from safetensors.torch import save_file

    weights, meta = _paths(name, directory)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    staged = [weights.with_name(f".{weights.name}.partial"), meta.with_name(f".{meta.name}.partial")]
    try:
        save_file(state, str(staged[0]))
        staged[1].write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
        os.replace(staged[0], weights)
        os.replace(staged[1], meta)
    finally:
        for path in staged:
            path.unlink(missing_ok=True)
    return weights


def read_record(name: str, directory: Path | str | None = None) -> dict[str, Any]:
    """The JSON record of checkpoint ``name`` (training command, seed, split, measured figures)."""
    _, meta = _paths(name, directory)
    _require(name, meta)
    return json.loads(meta.read_text())


def read_weights(module: nn.Module, name: str, directory: Path | str | None = None) -> nn.Module:
    """Load ``<name>.safetensors`` into ``module`` (strict) and return it in eval mode."""
    from safetensors.torch import load_file

    weights, _ = _paths(name, directory)
    _require(name, weights)
    module.load_state_dict(load_file(str(weights)))
    return module.eval().requires_grad_(False)


def require_checkpoint(name: str, directory: Path | str | None = None) -> None:
    """Both files of checkpoint ``name`` exist, or a ``FileNotFoundError`` names the missing one and the
    command that retrains it."""
    for path in _paths(name, directory):
        _require(name, path)


def _require(name: str, path: Path) -> None:
    """A missing checkpoint file names the command that retrains it (digits, glyphs or video zoo)."""
    if not path.exists():
        zoo = next((z for z in ("video", "glyphs") if name.startswith(z)), None)
        command = f"python -m guidekit.zoo.{zoo}.train" if zoo else "python -m guidekit.zoo.train"
        raise FileNotFoundError(f"checkpoint {name!r}: expected {path}, which does not exist (retrain: `{command}`)")
