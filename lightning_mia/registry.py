"""`Registry`: named plugins on the lowest floor of the package (it imports only `errors`).

    SOURCES = Registry("source")
    SOURCES.register("shapes", ShapesSource)      # or @SOURCES.register("shapes") on a class
    SOURCES["shapes"]                             # the class
    SOURCES["nope"]  # UnknownNameError: unknown source 'nope'; known: ['coco', 'shapes', ...]

Every registry of the package is one of these (sources, families, presets, feature groups,
attacks, gray-box signals): a name is registered once — a second registration of the same name
is refused, never silently replaced — and an unknown name fails with the list of known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

from lightning_mia.errors import UserError

T = TypeVar("T")


class UnknownNameError(UserError, KeyError):
    """A name no registry entry has; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(ValueError):  # a bug in the code that registers, not user input
    """A second registration of a name that is already taken."""


class Registry(Generic[T]):
    """An ordered name -> entry mapping that refuses duplicates and names the known entries."""

    def __init__(self, kind: str) -> None:
        """
        Args:
            kind: what an entry is, for messages ("source", "attack", "feature group", ...).
        """
        self.kind = kind
        self._entries: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, entry: T) -> T: ...

    def register(self, name: str, entry: T | None = None) -> T | Callable[[T], T]:
        """Add `entry` under `name` and return it; without `entry`, a decorator that does."""
        if entry is None:
            return lambda value: self.register(name, value)
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self._entries:
            raise DuplicateNameError(
                f"{self.kind} {name!r} is registered twice ({self._entries[name]!r} and "
                f"{entry!r}); choose another name"
            )
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Remove and return an entry (for plugins and tests that register temporarily)."""
        entry = self[name]
        del self._entries[name]
        return entry

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {self.names()}")
        return self._entries[name]

    def get(self, name: str, default: T | None = None) -> T | None:
        return self._entries.get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def values(self) -> list[T]:
        return list(self._entries.values())

    def check(self, names: list[str] | tuple[str, ...]) -> list[str]:
        """Problems with `names` (one line listing the unknown ones), [] when all are known."""
        unknown = [n for n in names if n not in self._entries]
        if not unknown:
            return []
        return [f"unknown {self.kind}s {unknown}; known: {self.names()}"]

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
