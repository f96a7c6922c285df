"""Concrete perturbations: model-agnostic specs of what to change in the network for one forward.

Each names the layers it acts on with ``layers``, selectors of module names in the backend's network:
:class:`IdentitySelfAttention` searches them as regular expressions among the self-attention modules
(diffusers' ``pag_applied_layers``: ``"mid"`` is every self-attention of the mid block);
:class:`SkipBlocks` names whole blocks, a module name or its dotted suffix (``"transformer_blocks.7"``,
never ``transformer_blocks.17``). A backend applies the kinds it lists in ``Backend.perturbations`` and
refuses others by name; a selector that matches no layer is an error naming the layers there are.
:class:`NormalizedAttention` (NAG) acts on cross-attention layers and carries a second condition, the
negative context, in its forward (:meth:`~guidekit.branch.Perturbation.conditions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .branch import Perturbation
from .errors import ConfigError
from .ops.attention import INFINITE_BLUR
from .ops.checks import check_number

__all__ = ["BlurredQueries", "IdentitySelfAttention", "NormalizedAttention", "SkipBlocks"]


@dataclass(frozen=True)
class IdentitySelfAttention(Perturbation):
    """Replace the self-attention map by the identity in the selected layers: each token attends only to
    itself, so the attention output is ``W_out · W_v · h`` (PAG, Ahn et al., ECCV 2024, arXiv 2403.17377)."""

    kind: ClassVar[str] = "identity-self-attention"
    layers: tuple[str, ...] = ("mid",)


@dataclass(frozen=True)
class SkipBlocks(Perturbation):
    """Skip the selected blocks: each returns its inputs (Skip-Layer Guidance, SD 3.5's SLG; STG-R on video).

    ``layers`` are block names or their dotted suffixes, e.g. ``("transformer_blocks.7",)``; SD3's
    ``skip_guidance_layers=[7, 8, 9]`` is ``tuple(f"transformer_blocks.{i}" for i in (7, 8, 9))``.
    """

    kind: ClassVar[str] = "skip-blocks"
    layers: tuple[str, ...] = ("transformer_blocks.7", "transformer_blocks.8", "transformer_blocks.9")

    def matches(self, selector: str, name: str) -> bool:
        """A block is named whole or by a dotted suffix (``transformer_blocks.7`` is never ``...blocks.17``)."""
        return name == selector or name.endswith("." + selector)


@dataclass(frozen=True)
class BlurredQueries(Perturbation):
    """Blur the self-attention queries of the selected layers with a 2-D Gaussian of ``sigma`` tokens
    (SEG, Hong, NeurIPS 2024, arXiv 2408.00760): smoother attention, lower "energy".

    ``sigma >= INFINITE`` is the infinite blur: every query becomes the mean query (uniform attention
    weights). A finite blur needs the square token grid of an image layer (odd kernel of ``ceil(6 sigma) + 1``
    taps, reflect padding, as the official code).
    """

    kind: ClassVar[str] = "blurred-queries"
    INFINITE: ClassVar[float] = INFINITE_BLUR
    layers: tuple[str, ...] = ("mid",)
    sigma: float = 9999999.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.sigma, int | float) or isinstance(self.sigma, bool) or not self.sigma > 0:
            raise ConfigError(
                f"sigma: expected a positive number (>= {self.INFINITE:g} is infinite), got {self.sigma!r}"
            )

    @property
    def infinite(self) -> bool:
        return self.sigma >= self.INFINITE


@dataclass(frozen=True)
class NormalizedAttention(Perturbation):
    """NAG's change to the cross-attention layers (Chen et al. 2025, arXiv 2505.21179): attention outputs
    ``z⁺`` (the branch's context) and ``z⁻`` (the ``negative`` condition's context, same queries) become
    ``α·normalise(φ z⁺ − (φ − 1) z⁻) + (1 − α) z⁺`` (:func:`guidekit.ops.attention.normalized_attention`).

    The forward carries the ``negative`` condition's rows beside the branch's rows in one batch; in the
    selected layers the branch's queries attend to both contexts and both rows continue with the guided
    output. ``layers = ()`` is every cross-attention layer (a diffusers ``Attention`` with
    ``is_cross_attention``; an ``nn.MultiheadAttention`` called with a key that is not its query).
    """

    kind: ClassVar[str] = "normalized-attention"
    layers: tuple[str, ...] = ()
    scale: float = 5.0
    tau: float = 2.5
    alpha: float = 0.25
    negative: str = "uncond"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("scale", self.scale)
        check_number("tau", self.tau, low=0.0)
        check_number("alpha", self.alpha, low=0.0, high=1.0)
        if not isinstance(self.negative, str) or not self.negative:
            raise ConfigError(f"negative: expected a condition name, got {self.negative!r}")

    def conditions(self) -> tuple[str, ...]:
        return (self.negative,)
