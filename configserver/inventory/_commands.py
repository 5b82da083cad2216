"""What `configserver devices`, `history` and `migrate` do: blocking calls and their output."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from ..identity import BROKEN_MODEL_NAMES, InvalidDeviceName, parse_device_name
from ._database import (
    InventoryError,
    database_url,
    describe,
    explain,
    open_sqlite_reader,
)
from ._queries import (
    Device,
    Poll,
    check_limit,
    check_status,
    parse_duration,
    stream_sqlite_devices,
)
from ._recorder import Inventory

T = TypeVar("T")

_CELL = 48


def _run(database: str, action: Callable[[Inventory], Awaitable[T]], *, create: bool = False) -> T:
    """Run one action against the database (schema brought up to date first), from sync code.

    Only `create` makes a database that is not there: a read pointed at the wrong place must say
    so, not show an empty fleet (and leave an empty database behind).
    """
    url = database_url(database)
    if not create and url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
        raise InventoryError(
            f"no inventory database at {url.database} (setting 'database'); "
            "configserver serve creates it when it starts, or run configserver migrate"
        )
    inventory = Inventory(database)

    async def run() -> T:
        try:
            if not create and not await inventory.has_schema():
                raise InventoryError(
                    f"{inventory.database} holds no inventory (setting 'database'); "
                    "configserver serve creates it when it starts, or run configserver migrate"
                )
            await inventory.migrate()
            return await action(inventory)
        except (SQLAlchemyError, OSError) as exc:
            raise InventoryError(
                f"cannot use the inventory database {inventory.database} (setting 'database'): "
                f"{explain(exc, database_url(database))}"
            ) from None
        finally:
            await inventory.close(timeout=0)

    return asyncio.run(run())


def migrate_database(database: str) -> int:
    """Create or migrate the inventory schema in `database`. Returns the schema version.

    Raises InventoryError when the URL is unusable or the database cannot be reached.
    """
    return _run(database, lambda inventory: inventory.migrate(), create=True)


def _seconds(name: str, value: str | float | None) -> float | None:
    if not isinstance(value, str):
        return value
    try:
        return parse_duration(value)
    except InventoryError as exc:
        raise InventoryError(f"{name}: {exc}") from None


def list_devices(
    database: str,
    *,
    model: str | None = None,
    since: str | float | None = None,
    status: int | None = None,
    stale: str | float | None = None,
    now: float | None = None,
) -> list[Device]:
    """Devices in `database` matching every filter given, most recently seen first.

    `since` and `stale` are durations (`30m`, `12h`, `7d`, `2w`) or seconds. Raises
    InventoryError for a bad duration or a database that cannot be used.
    """
    check_status(status)
    since_s, stale_s = _seconds("since", since), _seconds("stale", stale)
    return _run(
        database,
        lambda inventory: inventory.devices(model=model, since=since_s, status=status, stale=stale_s, now=now),
    )


def write_devices_json(
    database: str,
    out: TextIO,
    *,
    model: str | None = None,
    since: str | float | None = None,
    status: int | None = None,
    stale: str | float | None = None,
    now: float | None = None,
) -> int:
    """Write the devices of `list_devices` to `out` as `devices_json` has them, while the
    database hands them over: constant memory for any fleet. Returns how many were written.

    The output is one JSON array, one device per line. Raises InventoryError like `list_devices`.
    """
    count = 0

    def write(device: Device) -> None:
        nonlocal count
        out.write(("[\n" if count == 0 else ",\n") + device_json_text(device))
        count += 1

    _each_device(database, write, model=model, since=since, status=status, stale=stale, now=now)
    out.write("[]\n" if count == 0 else "\n]\n")
    return count


def write_devices_table(
    database: str,
    out: TextIO,
    *,
    model: str | None = None,
    since: str | float | None = None,
    status: int | None = None,
    stale: str | float | None = None,
    now: float | None = None,
) -> int:
    """Write the devices of `list_devices` to `out` as `devices_table` has them, in constant
    memory: one pass over the rows measures the columns, a second one prints. Returns how many."""
    now = time.time() if now is None else now
    filters: dict[str, Any] = {"model": model, "since": since, "status": status, "stale": stale, "now": now}
    widths = [len(name) for name in _DEVICE_HEADER]
    count = 0

    def measure(device: Device) -> None:
        nonlocal count
        for column, cell in enumerate(_device_cells(device, now)):
            widths[column] = max(widths[column], len(cell))
        count += 1

    _each_device(database, measure, **filters)
    if not count:
        out.write("no devices\n")
        return 0
    out.write(_line(_DEVICE_HEADER, widths))
    _each_device(database, lambda device: out.write(_line(_device_cells(device, now), widths)), **filters)
    return count


def _each_device(
    database: str,
    consume: Callable[[Device], object],
    *,
    model: str | None,
    since: str | float | None,
    status: int | None,
    stale: str | float | None,
    now: float | None,
) -> None:
    """Hand each device matching the filters to `consume`, as the database hands them over."""
    check_status(status)
    filters = {"model": model, "since": _seconds("since", since), "status": status,
               "stale": _seconds("stale", stale), "now": now}
    url = database_url(database)
    if url.get_backend_name() != "sqlite":
        async def each(inventory: Inventory) -> None:
            async for device in inventory.stream_devices(**filters):
                consume(device)

        _run(database, each)
        return

    async def ready(inventory: Inventory) -> None:
        return None

    _run(database, ready)  # there, and migrated
    engine = open_sqlite_reader(url)
    try:
        for device in stream_sqlite_devices(engine, **filters):
            consume(device)
    except (SQLAlchemyError, OSError) as exc:
        raise InventoryError(
            f"cannot use the inventory database {describe(url)} (setting 'database'): {explain(exc, url)}"
        ) from None
    finally:
        engine.dispose()


def device_history(
    database: str, device: str, *, limit: int = 20, fixes: Mapping[str, str] = BROKEN_MODEL_NAMES,
) -> list[Poll]:
    """The newest `limit` polls of one device (hwid or MAC, any case or separator).

    Raises InventoryError for a database that cannot be used or a limit out of range.
    """
    check_limit(limit)
    try:  # the name a device's certificate shows (IP222s-...) finds it under its fixed hwid
        device = parse_device_name(device.strip(), fixes).hwid
    except InvalidDeviceName:
        pass  # a MAC, or a hwid as the audit stored it
    return _run(database, lambda inventory: inventory.history(device, limit=limit))


def devices_json(devices: Iterable[Device]) -> list[dict[str, Any]]:
    """Devices in the shape of innovaphone's discovery list, plus our own fields (`device_json`)."""
    return [device_json(device) for device in devices]


def device_json(device: Device) -> dict[str, Any]:
    """One device in the shape of innovaphone's discovery list, plus our own fields.

    Shared fields: `mac`, `time` (last seen, unix seconds), `ip` (as seen by us), `localip` and
    `devattrs` (`mac`, `hwid`, `type`, `firm`, `boot`, `ver`, `localip`), with `""` for unknown
    text as the discovery list has it. Ours: `status`, `reason`, `template`, `script_sha256`,
    `first_seen`, `served_at`.
    """
    return {
            "mac": device.mac or "",
            "time": int(device.last_seen),
            "ip": device.client_ip or "",
            "localip": device.local_ip or "",
            "devattrs": {
                "mac": device.mac or "",
                "hwid": device.hwid or "",
                "type": device.model or "",
                "firm": device.firmware or "",
                "boot": device.boot or "",
                "ver": device.version or "",
                "localip": device.local_ip or "",
            },
            "status": device.status,
            "reason": device.reason,
            "template": device.template,
            "script_sha256": device.script_sha256,
            "first_seen": int(device.first_seen),
            "served_at": int(device.served_at) if device.served_at is not None else None,
        }


_DEVICE_HEADER = ["HWID", "MAC", "MODEL", "FIRMWARE", "LAST SEEN (UTC)", "AGO", "STATUS", "REASON", "TEMPLATE", "IP"]


def devices_table(devices: list[Device], now: float | None = None) -> str:
    """Devices as an aligned text table, one line per device (and a header)."""
    if not devices:
        return "no devices\n"
    now = time.time() if now is None else now
    rows = [_device_cells(device, now) for device in devices]
    widths = [max(len(row[column]) for row in [_DEVICE_HEADER, *rows]) for column in range(len(_DEVICE_HEADER))]
    return _line(_DEVICE_HEADER, widths) + "".join(_line(row, widths) for row in rows)


def _device_cells(device: Device, now: float) -> list[str]:
    return [_cell(value) for value in (
        device.hwid, device.mac, device.model, device.firmware, when(device.last_seen),
        age(now - device.last_seen), str(device.status), device.reason, device.template, device.client_ip,
    )]


def history_table(polls: list[Poll]) -> str:
    """Polls as an aligned text table, in the order given (newest first from `device_history`).

    A poll whose certificate only claimed the device shows `403 (claimed)`; a flood folded into
    one row says how many more polls like it came since when.
    """
    if not polls:
        return "no polls\n"
    rows = [
        [
            when(poll.time), f"{poll.status} (claimed)" if poll.claimed else str(poll.status), poll.reason,
            poll.decision, poll.client_ip, poll.path, poll.template, (poll.script_sha256 or "")[:12], poll.firmware,
            f"{poll.duration_ms:.1f}" if poll.duration_ms is not None else None,
            f"{poll.repeats} more since {when(poll.repeats_since or poll.time)}" if poll.repeats else None,
        ]
        for poll in polls
    ]
    header = ["TIME (UTC)", "STATUS", "REASON", "DECISION", "IP", "PATH", "TEMPLATE", "SCRIPT", "FIRMWARE", "MS",
              "LIKE THIS"]
    return table(header, rows)


_quoted = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]  # json.dumps's own, in C

_DEVICE_JSON = (
    '{"mac": %s, "time": %d, "ip": %s, "localip": %s, "devattrs": {"mac": %s, "hwid": %s, "type": %s, '
    '"firm": %s, "boot": %s, "ver": %s, "localip": %s}, "status": %d, "reason": %s, "template": %s, '
    '"script_sha256": %s, "first_seen": %d, "served_at": %s}'
)


def device_json_text(device: Device) -> str:
    """`json.dumps(device_json(device))`, at a third of the cost: a million devices' worth of
    dicts built only to be encoded would be most of what `devices --json` spends."""
    def text(value: str | None) -> str:
        return _quoted(value) if value else '""'

    def optional(value: str | None) -> str:
        return _quoted(value) if value is not None else "null"

    mac, local_ip = text(device.mac), text(device.local_ip)
    return _DEVICE_JSON % (
        mac, int(device.last_seen), text(device.client_ip), local_ip,
        mac, text(device.hwid), text(device.model), text(device.firmware), text(device.boot), text(device.version),
        local_ip, device.status, optional(device.reason), optional(device.template), optional(device.script_sha256),
        int(device.first_seen), int(device.served_at) if device.served_at is not None else "null",
    )


def table(header: list[str], rows: list[list[str | None]]) -> str:
    """Rows in aligned columns under `header`, as the commands print them; each cell printable
    (control characters escaped, `-` for none, cut to the column limit)."""
    cells = [header] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    return "".join(_line(row, widths) for row in cells)


def _line(cells: list[str], widths: list[int]) -> str:
    return "  ".join(value.ljust(width) for value, width in zip(cells, widths)).rstrip() + "\n"


def _cell(value: str | None) -> str:
    """Printable on a terminal: devices choose part of this text, so escape control characters."""
    if value is None or value == "":
        return "-"
    if value.isprintable():  # the common case, checked in C
        text = value
    else:
        text = "".join(char if char.isprintable() else f"\\x{ord(char):02x}" for char in value)
    return text if len(text) <= _CELL else text[: _CELL - 1] + "…"


def when(seconds: float | None) -> str:
    """A moment as the commands print it, UTC to the second; `-` for none."""
    return "-" if seconds is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def age(seconds: float) -> str:
    """A duration as the commands print it: its largest unit, `3d`, `5h`, `12m`, `40s`."""
    seconds = max(seconds, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
