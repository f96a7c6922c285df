"""Concrete perturbations: model-agnostic specs of what to change in the network for one forward.

Each names the layers it acts on with ``layers``, regular expressions searched in the module names of the
backend's network (diffusers' ``pag_applied_layers`` rule: ``"mid"`` matches every self-attention in the
mid block; a selector ending in a number matches that index only, ``blocks.1`` is not ``blocks.10``). A
backend applies the kinds it lists in ``Backend.perturbations`` and refuses others by name; a selector
that matches no layer is an error naming the layers there are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .branch import Perturbation

__all__ = ["IdentitySelfAttention"]


@dataclass(frozen=True)
class IdentitySelfAttention(Perturbation):
    """Replace the self-attention map by the identity in the selected layers: each token attends only to
    itself, so the attention output is ``W_out · W_v · h`` (PAG, Ahn et al., ECCV 2024, arXiv 2403.17377)."""

    kind: ClassVar[str] = "identity-self-attention"
    layers: tuple[str, ...] = ("mid",)
