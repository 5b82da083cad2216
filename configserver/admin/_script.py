"""What a device would get now, for the device page: `configserver render`'s answer, with its
secrets masked unless the admin asks to see them.

A variable is secret when its name (the last part of a dotted key) ends in `password`,
`secret`, `pin` or `key`, when a table holding it is named for secrets (`passwords.admin`), or
when the `admin_secret_vars` setting lists it (by its last part, its whole dotted name, or a
table holding it); `is_secret` is the rule. Tables nested in lists, TOML's arrays of tables
(`[[accounts]]`), are named by their place in the list: `accounts[0].password` is secret by its
last part too, and `accounts.password` in `admin_secret_vars` names it in every element. Its
value is masked in the variables table and wherever it appears in the
script, also percent-encoded as innovaphone's configuration lines carry values (`p%40ss%20w0rd`,
`quote()` and `quote_plus()` forms, either case of hex); values shorter than MIN_MASKED
characters are masked in the table only, since replacing them throughout would hide unrelated
text and tell what they are. The script is our template's text, but a template may write a
secret that is no variable (`/pwd literal`): innovaphone's syntax rules below apply to it too.

A configuration backup is the device's own text, not ours: besides the values of the device's
secret variables, `mask_config` masks what looks like a secret in innovaphone's own syntax, the
value after an option named like one (`/pwd x`, `/gk-pwd x`, `/key x`) and the value of a
`vars create` whose name is (`vars create X509/REQUESTKEY pb ...`). It masks more than needed
rather than less: the page says that "Show them" shows everything.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MASK = "••••••"
MIN_MASKED = 3
SECRET_ENDINGS = ("password", "secret", "pin", "key")
# a table whose name ends so holds secrets, whatever their own names
SECRET_TABLES = ("password", "passwords", "secret", "secrets", "credentials")


_INDEX = re.compile(r"\[\d+\]")


def is_secret(name: str, marked: Iterable[str] = ()) -> bool:
    """Whether the variable `name` (dotted for nested tables: `sip.password`, with the place in
    a list for a table in one: `accounts[0].password`) is a secret: its own name (the last part)
    ends like one (SECRET_ENDINGS), a table holding it is named for secrets (SECRET_TABLES:
    `passwords.admin`), or it, its last part or a table holding it is `marked` (`sip` marks
    every value of that table). A table named like a key or a PIN says nothing of what it holds:
    `[[function_key]]` holds labels and extensions, which the page must show."""
    parts = _INDEX.sub("", name).lower().split(".")
    listed = {m.lower() for m in marked}
    return (parts[-1].endswith(SECRET_ENDINGS) or parts[-1] in listed
            or any(part.endswith(SECRET_TABLES) for part in parts[:-1])
            or any(".".join(parts[:n]) in listed for n in range(1, len(parts) + 1)))


def flatten(variables: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested tables as dotted names, in the order they were given: `[("sip.password", "...")]`.

    A list holding tables or lists (an array of tables) is one name per element,
    `accounts[0].password`; a list of plain values stays one variable (`ntp = ["a", "b"]`).
    """
    out: list[tuple[str, Any]] = []
    for key, value in variables.items():
        out.extend(_flatten_value(f"{prefix}{key}", value))
    return out


def _flatten_value(name: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        return flatten(value, f"{name}.")
    if isinstance(value, (list, tuple)) and any(isinstance(item, (Mapping, list, tuple)) for item in value):
        return [pair for index, item in enumerate(value) for pair in _flatten_value(f"{name}[{index}]", item)]
    return [(name, value)]


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
    for name, value in flatten(variables):
        secret = is_secret(name, marked)
        if secret and not reveal:
            rows.append((name, MASK, True))
        else:
            rows.append((name, _shown(value), secret))
    if not reveal:
        script = mask_config(script, variables, marked)
    return Masked(script, rows, sum(1 for row in rows if row[2]))


def secret_values(variables: Mapping[str, Any], marked: Iterable[str] = ()) -> list[str]:
    """The texts of the secret variables' values worth masking wherever they appear, as they
    are and percent-encoded (`encodings`), longest first (so that a secret containing another
    is masked whole)."""
    marked = list(marked)
    found = {form for name, value in flatten(variables) if is_secret(name, marked)
             for text in _secret_texts(value) if len(text) >= MIN_MASKED for form in encodings(text)}
    return sorted(found, key=len, reverse=True)


def encodings(text: str) -> set[str]:
    """`text` and the forms percent-encoding gives it in a URL or a configuration line:
    `urllib.parse.quote()` (with and without `/` kept) and `quote_plus()`, upper- and
    lower-case hex."""
    forms = {text}
    for safe in ("", "/"):
        forms |= {urllib.parse.quote(text, safe=safe), urllib.parse.quote_plus(text, safe=safe)}
    return forms | {_LOWER_HEX.sub(lambda m: m[0].lower(), form) for form in forms}


_LOWER_HEX = re.compile(r"%[0-9A-F]{2}")


def hide(text: str, values: Iterable[str]) -> str:
    """`text` with every occurrence of each of `values` (longest first) masked; a short number
    (a PIN) only where it stands alone, not among other digits: PIN `100` leaves `/ext 1100`
    (a percent-escape before it is no digit of its own: `PIN%20100`)."""
    alternatives = [rf"(?:(?<!\d)|(?<=%[0-9A-Fa-f]{{2}})){re.escape(value)}(?!\d)"
                    if value.isdigit() and len(value) < WHOLE_NUMBER_BELOW else re.escape(value)
                    for value in values if value]
    return re.sub("|".join(alternatives), MASK, text) if alternatives else text


WHOLE_NUMBER_BELOW = 8


_SECRET_WORDS = "pwd|passwd|password|pass|secret|pin|key|psk"
# `/gk-pwd value`: an option whose name ends like a secret's, and its value
_SECRET_OPTION = re.compile(rf"(?<!\S)(/[\w.-]*(?:{_SECRET_WORDS}))(\s+)(\S+)", re.IGNORECASE)
# `vars create X509/REQUESTKEY pb 3082...`: a variable whose name holds such a word (an optional
# leading diff mark: the diff's lines are masked too)
_SECRET_VAR = re.compile(rf"^([-+ ]?\s*vars\s+create\s+\S*(?:{_SECRET_WORDS})\S*\s+\S+\s+)(.+)$", re.IGNORECASE)


def mask_config(text: str, variables: Mapping[str, Any] = {}, marked: Iterable[str] = ()) -> str:
    """A configuration backup (or a diff of two) with its secrets masked: the device's secret
    variables' values, and what innovaphone's syntax marks as a secret (see the module's text)."""
    lines = []
    for line in text.split("\n"):
        line = _SECRET_VAR.sub(lambda m: m[1] + MASK, line)
        lines.append(_SECRET_OPTION.sub(lambda m: m[1] + m[2] + MASK, line))
    return hide("\n".join(lines), secret_values(variables, marked))


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, (list, tuple)) else str(value)
