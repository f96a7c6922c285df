"""Base class of everything that is built from a config spec (strategies, energy parts, mappers)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .registry import Registry

__all__ = ["Component"]


class Component:
    """A small immutable object (a frozen dataclass in every built-in) with a registry name.

    Subclass bases set ``registry``; :meth:`guidekit.registry.Registry.register` sets ``registry_name``
    on the concrete class. :func:`guidekit.to_spec` reads the dataclass fields back as params.
    """

    registry: ClassVar[Registry[Any]]
    registry_name: ClassVar[str]

    def to_spec(self) -> Any:
        """This object as a JSON-serialisable :class:`~guidekit.config.ComponentSpec`."""
        from .config import to_spec

        return to_spec(self)
