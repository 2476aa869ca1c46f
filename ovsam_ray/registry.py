"""A name -> implementation table (exporters, converters) that fails loudly on an unknown name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from ovsam_ray.errors import UnknownNameError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(dict[str, T]):
    """A dict of named implementations; ``registry[name]`` for an unknown name raises ``KeyError``
    naming what was looked up and listing the known names."""

    def __init__(self, kind: str, entries: Mapping[str, T]) -> None:
        super().__init__(entries)
        self.kind = kind

    def __missing__(self, name: str) -> T:
        raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self))}")
