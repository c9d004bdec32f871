"""One generic registry: the name -> entry table behind model families, converters, benchmarks, launchers.

Every concept the framework lets users extend (lightning_modules.families, datamodules.converters,
evaluation.benchmarks, phenoscale.launch) keeps its entries in one `Registry`, so all of them
refuse collisions, report unknown names and keep their order the same way. The module is pure
Python at the top of the tree, outside the packages, because each of them (including
`datamodules`, which depends on nothing of the others) must be able to import it without
pulling in another package (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries in registration order; plugins add to it by importing the module that registers.

    `noun` names the concept in errors ("model family", "layout"); `origin(entry)` says who
    registered an entry (its module), so a collision between two plugins names both sides;
    `same(old, new)` decides when registering under a taken name is the same entry again (the
    newer object then replaces the older silently, e.g. a class re-created by a module reload)
    rather than a collision.
    """

    def __init__(
        self,
        noun: str,
        *,
        origin: Callable[[T], str],
        same: Callable[[T, T], bool] = operator.eq,
    ) -> None:
        self.noun = noun
        self._origin = origin
        self._same = same
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Add `entry` as `name`; a different entry under a taken name is a ValueError naming who holds it."""
        known = self._entries.get(name)
        if known is not None and not self._same(known, entry):
            raise ValueError(f"{self.noun} {name!r} is already registered by {self._origin(known)}")
        self._entries[name] = entry
        return entry

    def get(self, name: object) -> T:
        """The entry `name`, or a ValueError listing the registered names (the user's likely typo)."""
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(f"unknown {self.noun} {name!r}; registered: {', '.join(self._entries) or 'none'}")
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order (the package's own entries first)."""
        return tuple(self._entries)

    def values(self) -> tuple[T, ...]:
        """Registered entries, in registration order."""
        return tuple(self._entries.values())
