"""`Registry`: named plugins on the lowest floor of the package (it imports only `errors`).

    SOURCES = Registry("source", plugins="lightning_mia.data")
    @SOURCES.register("shapes")                   # in lightning_mia/data/shapes.py
    class ShapesSource: ...
    SOURCES["shapes"]     # imports lightning_mia.data.shapes on first use, returns the class
    SOURCES["nope"]       # UnknownNameError: unknown source 'nope'; known: ['coco', 'shapes', ...]

One convention for every registry of the package (sources, families, presets, feature groups,
attacks, gray-box signals): an entry is a class or a frozen dataclass instance, registered in
the module that defines it, and found by name (the big_vision pattern). A registry with
`plugins` packages imports, for an unknown name, the module of that name in each package
(`member-lists` -> `member_lists.py`), then, if the name is still unknown or the whole list is
asked for (`names()`, `items()`, `in`), every module of those packages: nothing keeps a list
of plugin modules by hand. A name is registered once — a second registration of the same name
is refused, never silently replaced — and an unknown name fails with the list of known ones.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
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


def module_name(entry: str) -> str:
    """The plugin module an entry name lives in: `member-lists` -> `member_lists`."""
    return entry.replace("-", "_")


class Registry(Generic[T]):
    """An ordered name -> entry mapping that refuses duplicates, names the known entries and
    imports the plugin modules that register its entries on demand."""

    def __init__(self, kind: str, plugins: str | tuple[str, ...] = ()) -> None:
        """
        Args:
            kind: what an entry is, for messages ("source", "attack", "feature group", ...).
            plugins: packages whose modules register entries (imported on demand).
        """
        self.kind = kind
        self.plugins = (plugins,) if isinstance(plugins, str) else tuple(plugins)
        self._entries: dict[str, T] = {}
        self._loaded = not self.plugins

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

    # --- plugin discovery ------------------------------------------------------------------
    def _import_named(self, name: str) -> None:
        """Import the module named after `name` in each plugin package, where one exists."""
        if not isinstance(name, str) or not name.replace("-", "_").isidentifier():
            return
        for package in self.plugins:
            target = f"{package}.{module_name(name)}"
            if importlib.util.find_spec(target) is not None:
                importlib.import_module(target)

    def load_all(self) -> None:
        """Import every module of the plugin packages (once): all entries are registered."""
        if self._loaded:
            return
        self._loaded = True
        for package in self.plugins:
            path = importlib.import_module(package).__path__
            for info in pkgutil.iter_modules(path):
                importlib.import_module(f"{package}.{info.name}")

    def _find(self, name: str) -> bool:
        if name not in self._entries and self.plugins:
            self._import_named(name)
            if name not in self._entries:
                self.load_all()
        return name in self._entries

    # --- mapping ------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> T:
        if not self._find(name):
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {self.names()}")
        return self._entries[name]

    def get(self, name: str, default: T | None = None) -> T | None:
        return self._entries[name] if self._find(name) else default

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._find(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def names(self) -> list[str]:
        """Registered names, in registration order (every plugin module imported first)."""
        self.load_all()
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        self.load_all()
        return list(self._entries.items())

    def values(self) -> list[T]:
        self.load_all()
        return list(self._entries.values())

    def check(self, names: list[str] | tuple[str, ...]) -> list[str]:
        """Problems with `names` (one line listing the unknown ones), [] when all are known."""
        unknown = [n for n in names if n not in self]
        if not unknown:
            return []
        return [f"unknown {self.kind}s {unknown}; known: {self.names()}"]

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"
