"""The lookup index of one folder: each lookup key (naming.lookup_key) -> the file used for it.

A dict of key strings costs about 110 bytes a file (the key, "devices/<hwid>", and its slot):
11 MB for a site of 100,000 device templates. This index keeps 16 bytes a file: the hash of
each key in one sorted array, and beside it the file's name (the very string the folder's
dict of files holds). A name found by its key's hash is that key's only if the name's own key
is that key, so two keys of one hash stay apart. Immutable: a change makes a new index.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Mapping, ValuesView

from .naming import lookup_key

# Up to this many keys changed at once, a new index is the old one copied with each change
# made in place; more (a checkout, start-up) and it is sorted anew
_EDITS_IN_PLACE = 64


def same_hash(hashes: array, hashed: int) -> range:
    """Where `hashed` sits in the sorted array `hashes`: every entry of that hash (a key's own
    among them, if it is there at all; which one is the caller's to check)."""
    return range(bisect_left(hashes, hashed), bisect_right(hashes, hashed))


class KeyIndex(Mapping[str, str]):
    """Lookup key -> file name, for the files of one folder (`suffix`: TEMPLATE_SUFFIX or
    VARS_SUFFIX; `fixes`: the broken model names, as the keys were made with them)."""

    __slots__ = ("_fixes", "_hashes", "_names", "_suffix")

    def __init__(self, suffix: str, fixes: Mapping[str, str], entries: Iterable[tuple[str, str]] = ()) -> None:
        self._suffix, self._fixes = suffix, fixes
        self._sorted(sorted((hash(key), name) for key, name in entries))

    def changed(self, updates: Mapping[str, str | None]) -> KeyIndex:
        """This index with each key of `updates` set to its file, or left out when None."""
        dropped: set[int] = set()
        added: list[tuple[int, str]] = []
        for key, name in updates.items():
            if (at := self._find(key)) >= 0:
                dropped.add(at)
            if name is not None:
                added.append((hash(key), name))
        if not dropped and not added:
            return self
        new = KeyIndex.__new__(KeyIndex)
        new._suffix, new._fixes = self._suffix, self._fixes
        if len(dropped) + len(added) > _EDITS_IN_PLACE:
            kept = ((hashed, name) for at, (hashed, name) in enumerate(zip(self._hashes, self._names))
                    if at not in dropped)
            new._sorted(sorted((*kept, *added)))
            return new
        hashes, names = array("q", self._hashes), list(self._names)
        for at in sorted(dropped, reverse=True):
            del hashes[at], names[at]
        for hashed, name in added:
            at = bisect_left(hashes, hashed)
            hashes.insert(at, hashed)
            names.insert(at, name)
        new._hashes, new._names = hashes, names
        return new

    def _sorted(self, pairs: list[tuple[int, str]]) -> None:
        self._hashes = array("q", [hashed for hashed, _ in pairs])
        self._names = [name for _, name in pairs]

    def _find(self, key: str) -> int:
        """Where `key`'s file sits, or -1."""
        for at in same_hash(self._hashes, hash(key)):
            if lookup_key(self._names[at], self._suffix, self._fixes) == key:
                return at
        return -1

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        at = self._find(key) if isinstance(key, str) else -1
        return self._names[at] if at >= 0 else default

    def __getitem__(self, key: str) -> str:
        at = self._find(key) if isinstance(key, str) else -1
        if at < 0:
            raise KeyError(key)
        return self._names[at]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._find(key) >= 0

    def __iter__(self) -> Iterator[str]:
        for name in self._names:
            yield lookup_key(name, self._suffix, self._fixes)  # type: ignore[misc]   # every name has a key

    def __len__(self) -> int:
        return len(self._names)

    def values(self) -> ValuesView[str]:
        """The files used, each for its own key (no key is worked out again)."""
        return _Files(self)

    def __repr__(self) -> str:
        return f"KeyIndex({dict(self.items())!r})"


class _Files(ValuesView[str]):
    def __iter__(self) -> Iterator[str]:
        return iter(self._mapping._names)  # type: ignore[attr-defined]

    def __contains__(self, name: object) -> bool:
        return name in self._mapping._names  # type: ignore[attr-defined]
