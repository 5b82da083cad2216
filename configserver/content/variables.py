"""Variables: reading vars files, and layering them into the read-only `vars` of a template.

Later layers override earlier ones, tables merged key by key (see snapshot.py for the order).
Pure functions on text and values.
"""

from __future__ import annotations

import csv
import io
import tomllib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any


def parse_vars(name: str, text: str) -> tuple[Any, str | None]:
    """The data of the vars file `name` (a dict for TOML, a list of row dicts for CSV), or an
    error the admin must fix. Other files carry no data."""
    try:
        if name.endswith(".toml"):
            return tomllib.loads(text), None
        if name.endswith(".csv"):
            return list(csv.DictReader(io.StringIO(text))), None
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
