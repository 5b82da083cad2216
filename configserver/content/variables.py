"""Variables: reading vars files, and layering them into the read-only `vars` of a template.

Later layers override earlier ones, tables merged key by key (see snapshot.py for the order).
Pure functions on text and values.

devices.csv is held once: its text, and an index from each device's key to where its row sits
in that text. A row is parsed when a device needs its values, so a table of 100,000 rows costs
its own size and 1.6 MB of index, not a dict per row.
"""

from __future__ import annotations

import csv
import io
import itertools
import re
import tomllib
from array import array
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from ..innovaphone import BROKEN_MODEL_NAMES
from .lookup import same_hash
from .naming import DEVICES_CSV, csv_row_device

_NOT_VARIABLES = ("hwid", "mac")   # devices.csv's columns that name the device
# A row's place in the index, packed into one int that sorts as (key hash, row further down first)
_HASH_BIAS = 1 << 63
_ROW_BITS = 32
_LAST_ROW = (1 << _ROW_BITS) - 1
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")   # a line and its end, as csv reads them


class DeviceRows:
    """The rows of devices.csv by device key (see naming.csv_row_device), read from its text on
    demand. When several rows name one device, the last counts.

    The index is two sorted arrays, 16 bytes a row (a dict of key strings costs about 150): the
    hash of each device's key, and where its row sits in the text. A row found by its hash is
    the device's own only if the row, parsed, names that key: two keys of one hash stay apart.
    """

    __slots__ = ("_text", "_columns", "_hashes", "_spans", "_fixes")

    def __init__(self, text: str, fixes: Mapping[str, str] = BROKEN_MODEL_NAMES) -> None:
        self._text = text
        self._fixes = fixes
        # Built without a Python object per row that outlives the row: a table read at start-up
        # or after an edit must not leave the worker a peak of memory (a dict of keys cost 39 MB
        # for 100,000 rows, which stayed with the worker once freed)
        starts = array("Q", [0])   # where each line starts in the text
        def tracked() -> Any:   # the lines as io.StringIO(text, newline="") gives them, uncopied
            for line in _LINE.finditer(text):
                starts.append(line.end())
                yield line.group()
        reader = csv.reader(tracked())
        self._columns: tuple[str, ...] = tuple(next(reader, ()))
        spans = array("Q")   # per row naming a device: start << 32 | end, in characters
        order: list[int] = []   # per such row: its key's hash and its number, packed to sort
        where = reader.line_num
        for values in reader:
            start, where = starts[where], reader.line_num
            key = self._key(values)
            if key is not None:
                order.append((hash(key) + _HASH_BIAS) << _ROW_BITS | (_LAST_ROW - len(spans)))
                spans.append(start << 32 | starts[where])
        order.sort()   # by hash; of one hash, the row further down first: the last row counts
        self._hashes, self._spans = array("q"), array("Q")
        for hashed, packed in itertools.groupby(order, key=lambda packed: packed >> _ROW_BITS):
            rows = [spans[_LAST_ROW - (one & _LAST_ROW)] for one in packed]
            if len(rows) > 1:   # one device named twice (the last row counts), or keys of one hash
                rows = self._one_per_device(rows)
            for span in rows:
                self._hashes.append(hashed - _HASH_BIAS)
                self._spans.append(span)

    @property
    def columns(self) -> tuple[str, ...]:
        """The header row: which variable each cell of a row sets."""
        return self._columns

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.row(key) is not None

    def rows(self) -> Iterator[dict[str, str]]:
        """Every row as the file has it, column -> cell (for `check` and `render`, not for polls)."""
        return csv.DictReader(io.StringIO(self._text, newline=""))

    def row(self, key: str) -> tuple[str, Mapping[str, str]] | None:
        """The text of the row that names `key` (what a kept answer compares) and its variables
        (empty cells left out), or None."""
        for at in same_hash(self._hashes, hash(key)):
            line, values, named = self._parse(self._spans[at])
            if named == key:
                return line, {column: value for column, value in zip(self._columns, values)
                              if column and column not in _NOT_VARIABLES and value != ""}
        return None

    def _one_per_device(self, spans: list[int]) -> list[int]:
        """Of rows whose keys hash alike (the last in the file first), the first that names each device."""
        seen: set[str | None] = set()
        kept = []
        for span in spans:
            key = self._parse(span)[2]
            if key not in seen:
                seen.add(key)
                kept.append(span)
        return kept

    def _parse(self, span: int) -> tuple[str, list[str], str | None]:
        """The row at `span` of the text: its line, its cells, and the key of the device it names."""
        line = self._text[span >> 32: span & 0xFFFFFFFF]
        values = next(csv.reader(io.StringIO(line, newline="")), [])
        return line, values, self._key(values)

    def line(self, key: str) -> str | None:
        """The text of the row that names `key`, or None."""
        found = self.row(key)
        return None if found is None else found[0]

    def values(self, key: str) -> Mapping[str, str] | None:
        """The variables of the row that names `key` (empty cells left out), or None."""
        found = self.row(key)
        return None if found is None else found[1]

    def _key(self, values: list[str]) -> str | None:
        row = dict(zip(self._columns, values))
        return csv_row_device(row.get("hwid"), row.get("mac"), self._fixes).key


def parse_vars(name: str, text: str, fixes: Mapping[str, str] = BROKEN_MODEL_NAMES) -> tuple[Any, str | None]:
    """The data of the vars file `name` (a dict for TOML, the rows by device for devices.csv),
    or an error the admin must fix. Other files carry no data."""
    try:
        if name.endswith(".toml"):
            return tomllib.loads(text), None
        if name == DEVICES_CSV:
            return DeviceRows(text, fixes), None
    except tomllib.TOMLDecodeError as exc:
        return None, f"not valid TOML: {exc}"
    except csv.Error as exc:
        return None, f"not valid CSV: {exc}"
    except Exception as exc:  # RecursionError on absurd nesting, and the like: still the file's fault
        return None, f"cannot be read as {name.rsplit('.', 1)[-1].upper()}: {type(exc).__name__}: {exc}"
    return None, None


def merge(base: Mapping[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """`base` overridden by `layer`; tables present in both are merged key by key."""
    out = dict(base)
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def freeze(value: Any) -> Any:
    """A read-only copy: tables become read-only mappings, lists tuples. Templates share it."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    return value
