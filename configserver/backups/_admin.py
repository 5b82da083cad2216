"""What `configserver backups` does: blocking calls against the database, and their output.

Backups hold passwords: `--show` prints one on purpose, to the admin who asked; nothing else
here prints a backup's lines except the diff the admin asked for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from ..identity import InvalidDeviceName, normalize_mac, parse_device_name
from ..inventory import InventoryError, age, database_url, parse_duration, table, when
from ._schedule import ALL, device_target, model_target
from ._store import BackupState, BackupStore, Version
from ._text import decode, meaningful_lines, unified_diff

T = TypeVar("T")


class BackupsError(InventoryError):
    """`configserver backups` cannot do what was asked; the text says why."""


# Version numbers are the database's 64-bit integers: a larger one names no version, and the
# drivers would refuse to bind it (OverflowError) rather than find nothing.
MAX_VERSION = 2**63 - 1


def version_number(value: str | int) -> int:
    """A version number as the admin typed it (`--show N`, `--diff A B`). Raises BackupsError
    for anything but a whole number from 1 to MAX_VERSION."""
    text = str(value).strip()
    number = int(text) if text.lstrip("+-").isdigit() and len(text) <= 20 else None
    if number is None or not 1 <= number <= MAX_VERSION:
        raise BackupsError(f"{_shown(text)} is not a version number (1, 2, ...: see configserver backups HWID)")
    return number


def device_key(text: str, fixes: Mapping[str, str]) -> tuple[str, str | None]:
    """A hwid (`IP232-30-00-af`, broken early names too) or MAC as (MAC, hwid or None).

    Raises BackupsError for anything else.
    """
    try:
        name = parse_device_name(text.strip(), fixes)
        return name.mac, name.hwid
    except InvalidDeviceName:
        mac = normalize_mac(text.strip())
        if mac is None:
            raise BackupsError(f"{_shown(text)} is neither a hwid (IP232-30-00-af) nor a MAC (00-90-33-30-00-af)") from None
        return mac, None


def run(database: str, action: Callable[[BackupStore], Awaitable[T]], **options: Any) -> T:
    """Run one action against the database (schema brought up to date first), from sync code.

    A SQLite file that is not there is an error, not an empty list. Raises BackupsError.
    """
    url = database_url(database)
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
        raise BackupsError(
            f"no inventory database at {url.database} (setting 'database'); "
            "configserver serve creates it when it starts, or run configserver migrate"
        )
    store = BackupStore(database, **options)

    async def go() -> T:
        try:
            await store.migrate()
            return await action(store)
        except (SQLAlchemyError, OSError) as exc:
            # the type only: a driver's message may quote a statement's parameters
            raise BackupsError(
                f"cannot use the database {store.database} (setting 'database'): {type(exc).__name__}"
            ) from None
        finally:
            await store.close()

    return asyncio.run(go())


# -- listing ----------------------------------------------------------------------------------


def listing(
    device: str, mac: str, state: BackupState | None, versions: Sequence[Version],
    facts: Mapping[str, tuple[float, dict[str, Any]]],
) -> str:
    """The versions of one device (newest first), its upload counters and its facts."""
    out = []
    if state is None:
        out.append(f"{device} ({mac}): no backups")
    else:
        out.append(
            f"{_printable(state.hwid or device)} ({mac}): {len(versions)} version{'' if len(versions) == 1 else 's'} "
            f"kept, {state.uploads} upload{'' if state.uploads == 1 else 's'}, last upload {when(state.last_upload_at)}"
        )
    if versions:
        rows = [
            [str(v.number), when(v.stored_at), str(v.size), str(v.lines),
             "first" if v.lines_changed is None else str(v.lines_changed)]
            for v in versions
        ]
        out.append(table(["VERSION", "STORED (UTC)", "BYTES", "LINES", "LINES CHANGED"], rows).rstrip("\n"))
    out.extend(_facts_lines(facts))
    return "\n".join(out) + "\n"


def _facts_lines(facts: Mapping[str, tuple[float, dict[str, Any]]]) -> list[str]:
    if not facts:
        return []
    out = ["facts, as the device reports them:"]
    if "cmd0" in facts:
        at, data = facts["cmd0"]
        parts = [f"{label} {_printable(data.get(key))}" for label, key in
                 (("name", "name"), ("firmware", "firmware"), ("boot", "boot"), ("hardware", "hardware"))
                 if data.get(key)]
        out.append(f"  device: {', '.join(parts) or 'nothing readable'} ({when(at)})")
    if "x509" in facts:
        at, data = facts["x509"]
        for cert in data.get("certificates", []):
            out.append(
                f"  certificate: {_printable(cert.get('subject_cn'))}, issued by {_printable(cert.get('issuer_cn'))}, "
                f"valid {_printable(cert.get('not_before'))} to {_printable(cert.get('not_after'))} ({when(at)})"
            )
        if data.get("requests"):
            out.append(f"  signing requests waiting on the device: {data['requests']}")
    return out


def missing_table(found: Sequence[BackupState], now: float | None = None) -> str:
    """Devices without a recent backup, longest missing first."""
    if not found:
        return "no devices missing a backup\n"
    now = time.time() if now is None else now
    rows = [
        [_printable(state.hwid), state.device, _printable(state.model), when(state.last_upload_at),
         age(now - state.last_upload_at) if state.last_upload_at is not None else "-", when(state.last_seen)]
        for state in found
    ]
    return table(["HWID", "MAC", "MODEL", "LAST BACKUP (UTC)", "AGO", "LAST SEEN (UTC)"], rows)


def diff_text(mac: str, label: str, old: tuple[int, bytes], new: tuple[int, bytes]) -> str:
    """A unified diff of two versions' meaningful lines (the lines that change on every upload
    left out, as when deciding what is a new version)."""
    return unified_diff(
        meaningful_lines(decode(old[1])), meaningful_lines(decode(new[1])),
        f"{label} version {old[0]}", f"{label} version {new[0]}",
    )


def request_targets(names: Sequence[str], groups: Mapping[str, Sequence[str]], fixes: Mapping[str, str]) -> list[tuple[str, str]]:
    """Each name as (target, what it means): `all`, a hwid or MAC, a group of the `groups`
    setting (its models), or a model. Raises BackupsError for a name that is none of these."""
    targets: list[tuple[str, str]] = []
    for name in names:
        text = name.strip()
        if text.lower() == ALL:
            targets.append((ALL, "every device"))
            continue
        try:
            mac, hwid = device_key(text, fixes)
            targets.append((device_target(mac), f"device {hwid or mac}"))
            continue
        except BackupsError:
            pass
        if text in groups:
            targets += [(model_target(model), f"model {model} (group {text})") for model in groups[text]]
        elif text.replace("-", "").isalnum():
            targets.append((model_target(text), f"model {text}"))
        else:
            raise BackupsError(f"{_shown(text)} is not all, a hwid, a MAC, a group or a model")
    return targets


# -- small text helpers -----------------------------------------------------------------------


def _printable(value: Any) -> str:
    """Printable on a terminal: devices choose this text, so control characters are escaped."""
    if value is None or value == "":
        return "-"
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in str(value))


def _shown(text: str) -> str:
    """An argument quoted for a message: bytes that were not UTF-8 (lone surrogates, as Python
    hands them over) as \\xNN, control characters escaped, never more than 80 characters."""
    raw = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return f"'{_printable(raw[:80])}{'...' if len(raw) > 80 else ''}'"


__all__ = [
    "MAX_VERSION",
    "BackupsError",
    "InventoryError",
    "device_key",
    "diff_text",
    "listing",
    "missing_table",
    "parse_duration",
    "request_targets",
    "run",
    "version_number",
]
