"""Named registries: the places where a new loss family (loss/family.py), dataset format
(data_shards/formats/__init__.py), tracking backend (trainer/tracking/backend.py) or piece of checkpointed state
(trainer/state_parts.py) is added with one line. Each room keeps its own rules for names; this is what they share.

    FAMILIES = Registry("loss family")
    FAMILIES.add("proxygml", ProxyGMLFamily())     # ValueError when the name is taken by another item
    FAMILIES.get("proxygml", key="loss.family")    # ValueError "loss.family: 'x' is not one of 'proxygml', ..."
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


def _same_class(a, b) -> bool:
    return (a if isinstance(a, type) else type(a)) is (b if isinstance(b, type) else type(b))


def _describe(item) -> str:
    return getattr(item, "__name__", None) or type(item).__name__


class Registry(Generic[T]):
    """Items of one kind by name, in registration order. `same(old, new)` says when registering a name again is
    the same registration (default: the same class, or an instance of the same class), which is then kept."""

    def __init__(self, kind: str, same: Callable[[T, T], bool] = _same_class):
        self.kind, self.same = kind, same
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        """Register `item` as `name`; ValueError naming the item that has the name already."""
        old = self._items.get(name)
        if old is not None and not self.same(old, item):
            raise ValueError(f"{self.kind} {name!r} is already registered ({_describe(old)})")
        self._items[name] = item
        return item

    def remove(self, name: str) -> None:
        """Forget `name` (tests that register a toy clean up with this); nothing when it is not registered."""
        self._items.pop(name, None)

    def as_dict(self) -> dict[str, T]:
        """{name: item}, in registration order (a copy)."""
        return dict(self._items)

    def get(self, name: str, key: str) -> T:
        """The item registered as `name`; ValueError whose message starts with the config `key` that chose it and
        names the registered ones."""
        if name not in self._items:
            names = ", ".join(repr(n) for n in self._items) or "none"
            raise ValueError(f"{key}: {name!r} is not one of {names} (the registered {self.kind} names)")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items
