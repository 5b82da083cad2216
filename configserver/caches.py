"""One bounded cache for every memo on the poll path, with one policy.

A fleet polls its devices in turn, so recency says little about the next poll; what matters is
that memory stays bounded whatever the fleet's size. When full, the entry stored first goes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """A mapping of at most `size` entries, and, given `weigh`, of at most `max_bytes` by that
    measure; storing one more drops the oldest stored until both bounds hold.

    `get` and `put` are plain dict operations, cheap enough for every poll. Not thread-safe:
    each cache is used from one thread (the event loop) or holds values that are cheap to redo.
    """

    __slots__ = ("size", "max_bytes", "_weigh", "_bytes", "_entries")

    def __init__(self, size: int, *, max_bytes: int | None = None, weigh: Callable[[V], int] | None = None) -> None:
        if size < 1:
            raise ValueError("a cache holds at least one entry")
        if (max_bytes is None) != (weigh is None):
            raise ValueError("max_bytes and weigh go together")
        self.size = size
        self.max_bytes = max_bytes
        self._weigh = weigh
        self._bytes = 0
        self._entries: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        return self._entries.get(key)

    def put(self, key: K, value: V) -> V:
        entries, weigh = self._entries, self._weigh
        if weigh is None:
            if key not in entries and len(entries) >= self.size:
                del entries[next(iter(entries))]
            entries[key] = value
            return value
        old = entries.pop(key, None)
        if old is not None:
            self._bytes -= weigh(old)
        self._bytes += weigh(value)
        while entries and (len(entries) >= self.size or self._bytes > self.max_bytes):  # type: ignore[operator]
            self._bytes -= weigh(entries.pop(next(iter(entries))))
        entries[key] = value
        return value

    @property
    def bytes(self) -> int:
        """What the entries weigh together (0 without `weigh`)."""
        return self._bytes

    __setitem__ = put   # what Jinja calls on its compiled-template cache

    def __getitem__(self, key: K) -> V:
        return self._entries[key]

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
        self._bytes = 0
