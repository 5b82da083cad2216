"""Variables: reading vars files, and layering them into the read-only `vars` of a template.

Later layers override earlier ones, tables merged key by key (see snapshot.py for the order).
Pure functions on text and values.

devices.csv is held once: its text, and an index from each device's key to where its row sits
in that text. A row is parsed when a device needs its values, so a table of 100,000 rows costs
its own size and a small index, not a dict per row.
"""

from __future__ import annotations

import csv
import io
import tomllib
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from ..innovaphone import BROKEN_MODEL_NAMES
from .naming import DEVICES_CSV, csv_row_device

_NOT_VARIABLES = ("hwid", "mac")   # devices.csv's columns that name the device


class DeviceRows:
    """The rows of devices.csv by device key (see naming.csv_row_device), read from its text on
    demand. When several rows name one device, the last counts."""

    __slots__ = ("_text", "_columns", "_spans")

    def __init__(self, text: str, fixes: Mapping[str, str] = BROKEN_MODEL_NAMES) -> None:
        self._text = text
        lines = io.StringIO(text, newline="")
        starts = [0]   # where each line starts in the text
        def tracked() -> Any:
            for line in lines:
                starts.append(starts[-1] + len(line))
                yield line
        reader = csv.reader(tracked())
        self._columns: tuple[str, ...] = tuple(next(reader, ()))
        self._spans: dict[str, int] = {}   # key -> start << 32 | end, in characters
        where = reader.line_num
        for values in reader:
            start, where = starts[where], reader.line_num
            row = dict(zip(self._columns, values))
            named = csv_row_device(row.get("hwid"), row.get("mac"), fixes)
            if named.key is not None:
                self._spans[named.key] = start << 32 | starts[where]

    @property
    def columns(self) -> tuple[str, ...]:
        """The header row: which variable each cell of a row sets."""
        return self._columns

    def __len__(self) -> int:
        return len(self._spans)

    def __contains__(self, key: object) -> bool:
        return key in self._spans

    def rows(self) -> Iterator[dict[str, str]]:
        """Every row as the file has it, column -> cell (for `check` and `render`, not for polls)."""
        return csv.DictReader(io.StringIO(self._text, newline=""))

    def line(self, key: str) -> str | None:
        """The text of the row that names `key`, or None: what a kept answer compares."""
        span = self._spans.get(key)
        return None if span is None else self._text[span >> 32: span & 0xFFFFFFFF]

    def values(self, key: str) -> Mapping[str, str] | None:
        """The variables of the row that names `key` (empty cells left out), or None."""
        line = self.line(key)
        if line is None:
            return None
        values = next(csv.reader(io.StringIO(line, newline="")), [])
        return {column: value for column, value in zip(self._columns, values)
                if column and column not in _NOT_VARIABLES and value != ""}


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
