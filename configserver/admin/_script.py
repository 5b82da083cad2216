"""What a device would get now, for the device page: `configserver render`'s answer, with its
secrets masked unless the admin asks to see them.

A variable is secret when its name (the last part of a dotted key) ends in `password`,
`secret`, `pin` or `key`, or when the `admin_secret_vars` setting lists it (by its last part or
its whole dotted name). Its value is masked in the variables table and wherever it appears in the
script; values shorter than MIN_MASKED characters are masked in the table only, since replacing
them throughout would hide unrelated text and tell what they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MASK = "••••••"
MIN_MASKED = 3
SECRET_ENDINGS = ("password", "secret", "pin", "key")


def is_secret(name: str, marked: Iterable[str] = ()) -> bool:
    """Whether the variable `name` (dotted for nested tables: `sip.password`) is a secret."""
    last = name.rsplit(".", 1)[-1].lower()
    listed = {m.lower() for m in marked}
    return last.endswith(SECRET_ENDINGS) or last in listed or name.lower() in listed


def flatten(variables: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested tables as dotted names, in the order they were given: `[("sip.password", "...")]`."""
    out: list[tuple[str, Any]] = []
    for key, value in variables.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.extend(flatten(value, f"{name}."))
        else:
            out.append((name, value))
    return out


def _secret_texts(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [text for item in value for text in _secret_texts(item)]
    return [str(value)]


@dataclass(frozen=True)
class Masked:
    """A script and its variables as the page shows them."""

    script: str
    variables: list[tuple[str, str, bool]]   # name, value as shown, whether it is a secret
    secrets: int                             # how many variables are secret


def mask(script: str, variables: Mapping[str, Any], marked: Iterable[str] = (), *, reveal: bool = False) -> Masked:
    """Mask the secret variables' values in `script` and in the variables table (not with `reveal`)."""
    marked = list(marked)
    rows: list[tuple[str, str, bool]] = []
    hidden: set[str] = set()
    for name, value in flatten(variables):
        secret = is_secret(name, marked)
        if secret and not reveal:
            hidden.update(text for text in _secret_texts(value) if len(text) >= MIN_MASKED)
            rows.append((name, MASK, True))
        else:
            rows.append((name, _shown(value), secret))
    # longest first, so that a secret containing another is masked whole
    for text in sorted(hidden, key=len, reverse=True):
        script = script.replace(text, MASK)
    return Masked(script, rows, sum(1 for row in rows if row[2]))


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, (list, tuple)) else str(value)
