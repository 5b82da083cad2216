"""One bounded cache for every memo on the poll path, with one policy.

A fleet polls its devices in turn, so recency says little about the next poll; what matters is
that memory stays bounded whatever the fleet's size. When full, the entry stored first goes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """A mapping of at most `size` entries; storing one more drops the oldest stored.

    `get` and `put` are plain dict operations, cheap enough for every poll. Not thread-safe:
    each cache is used from one thread (the event loop) or holds values that are cheap to redo.
    """

    __slots__ = ("size", "_entries")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a cache holds at least one entry")
        self.size = size
        self._entries: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        return self._entries.get(key)

    def put(self, key: K, value: V) -> V:
        entries = self._entries
        if key not in entries and len(entries) >= self.size:
            del entries[next(iter(entries))]
        entries[key] = value
        return value

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)

    def values(self) -> Iterator[V]:
        return iter(self._entries.values())

    def clear(self) -> None:
        self._entries.clear()
