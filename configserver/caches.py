"""One bounded cache for every memo on the poll path, with one policy.

A fleet polls its devices in turn: the device asked for next is the one asked for longest ago.
Making room for every newcomer by evicting the entry used longest ago (LRU, or FIFO) is then the
worst policy there is for a cache smaller than the fleet: every entry goes just before it would
have been used, and no poll is ever served from the cache. This cache keeps what it holds
instead: while there is room every entry is kept; once full, one newcomer in ADMIT_ONE_IN takes
the place of the entry stored longest ago, and the others are returned but not kept. A fleet
of N devices polling in turn through a cache of C entries then finds a steady share of its
polls in the cache, round after round (with N = 10 C: 8.6 %, where C/N is 10 %), as long as
the newcomers kept in a round (N/32) are fewer than C; beyond that the cache turns over
within a round and finds none. An entry no longer used (a device that left the fleet) goes in
its turn. This is "bimodal insertion" (Qureshi et al., "Adaptive insertion policies for
high performance caching", ISCA 2007), with its 1/32.

A cache whose keys are not all alike, where some are used by every poll (Jinja's compiled
templates: default.j2 beside one template per device), is made with `promote_hits`: a hit
moves its entry to the end, so that the entry used longest ago goes first and default.j2 never
does. Not for caches keyed by device: there the entry used longest ago is the device about to
poll, and promoting hits would cost most of the hits (none at all once C is under N/32).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

ADMIT_ONE_IN = 32   # when full: one newcomer in this many is kept (and the least used go)
# What a worker gives the caches kept per device (certificate verdicts and answers, half each)
# unless the setting poll_cache_mb says otherwise: answers of about 5,500 devices, verdicts of
# 8,400 to 18,000 (admission.py, poll.py)
POLL_CACHE_MB = 12


def half_of_the_poll_caches(poll_cache_mb: int = POLL_CACHE_MB) -> int:
    """Bytes each of the two caches kept per device may weigh: the verdicts', the answers'."""
    return poll_cache_mb * 1024 * 1024 // 2


class BoundedCache(Generic[K, V]):
    """A mapping of at most `size` entries, and, given `weigh`, of at most `max_bytes` by that
    measure. A newcomer that finds it full is kept one time in ADMIT_ONE_IN, and then the
    entries stored (with `promote_hits`: used) longest ago go until both bounds hold; a value
    heavier than `max_bytes` alone is never kept. Storing a key that is held replaces its value
    (others go if needed).

    `get` and `put` are plain dict operations, cheap enough for every poll. Not thread-safe:
    each cache is used from one thread (the event loop) or holds values that are cheap to redo.
    """

    __slots__ = ("size", "max_bytes", "_weigh", "_bytes", "_entries", "_turned_away", "get")

    def __init__(
        self, size: int, *, max_bytes: int | None = None, weigh: Callable[[V], int] | None = None,
        promote_hits: bool = False,
    ) -> None:
        if size < 1:
            raise ValueError("a cache holds at least one entry")
        if (max_bytes is None) != (weigh is None):
            raise ValueError("max_bytes and weigh go together")
        self.size = size
        self.max_bytes = max_bytes
        self._weigh = weigh
        self._bytes = 0
        self._entries: dict[K, V] = {}
        self._turned_away = 0   # newcomers not kept since the last one that was
        # the value held for a key, or None
        self.get: Callable[[K], V | None] = self._get_promoting if promote_hits else self._entries.get

    @classmethod
    def weighed(cls, max_bytes: int, weigh: Callable[[V], int], lightest: int, *,
                size: int | None = None) -> BoundedCache[K, V]:
        """A cache bounded by what its entries weigh (`max_bytes`), and in count by `size` or,
        without it (None or 0), by as many entries of the `lightest` weight any has (its
        overhead) as fit."""
        return cls(size or max(1, max_bytes // lightest), max_bytes=max_bytes, weigh=weigh)

    def _get_promoting(self, key: K) -> V | None:
        entries = self._entries
        value = entries.pop(key, None)
        if value is not None:
            entries[key] = value   # used now: the last to go
        return value

    def put(self, key: K, value: V) -> V:
        """Keep `value` for `key` if the policy lets it in; returns `value` either way."""
        entries, weigh = self._entries, self._weigh
        if weigh is None:
            if key not in entries and len(entries) >= self.size:
                if not self._admit():
                    return value
                while len(entries) >= self.size:
                    del entries[next(iter(entries))]
            entries[key] = value
            return value
        weight = weigh(value)
        old = entries.pop(key, None)
        if old is not None:
            self._bytes -= weigh(old)
        if weight > self.max_bytes:  # type: ignore[operator]
            return value
        if old is None and (len(entries) >= self.size or self._bytes + weight > self.max_bytes) and not self._admit():  # type: ignore[operator]
            return value
        while entries and (len(entries) >= self.size or self._bytes + weight > self.max_bytes):  # type: ignore[operator]
            self._bytes -= weigh(entries.pop(next(iter(entries))))
        entries[key] = value
        self._bytes += weight
        return value

    def _admit(self) -> bool:
        """Whether a newcomer that finds the cache full is kept: one in ADMIT_ONE_IN."""
        self._turned_away += 1
        if self._turned_away < ADMIT_ONE_IN:
            return False
        self._turned_away = 0
        return True

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
