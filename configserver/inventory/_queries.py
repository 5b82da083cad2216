"""Asking the inventory about the fleet: devices by filter, one device's polls, durations."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, fields
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from ..durations import HOW, duration_seconds
from ..identity import InvalidDeviceName, normalize_mac, parse_device_name
from ._database import InventoryError, devices, polls
from ._rows import hwid_key


@dataclass(frozen=True, slots=True)
class Device:
    """One device as the inventory knows it. Times are unix seconds; reported facts are untrusted."""

    hwid: str | None
    mac: str | None
    model: str | None
    first_seen: float
    last_seen: float
    status: int           # of the newest poll
    reason: str | None    # of the newest poll; None when it was served
    path: str | None
    client_ip: str | None
    template: str | None  # of the newest poll answered with a script
    script_sha256: str | None
    served_at: float | None
    firmware: str | None  # as last reported by the device
    boot: str | None
    version: str | None
    local_ip: str | None


@dataclass(frozen=True, slots=True)
class Poll:
    """One audited poll, served or refused. `query` is what the device sent, untrusted."""

    time: float
    hwid: str | None
    mac: str | None
    model: str | None
    client_ip: str | None
    path: str
    status: int
    reason: str | None
    detail: str | None
    template: str | None
    script_sha256: str | None
    decision: str | None
    check_reported: str | None
    check_digest: str | None
    firmware: str | None
    duration_ms: float | None
    query: dict[str, Any]
    claimed: bool = False               # hwid/MAC/model named by a certificate that did not prove them
    repeats: int = 0                    # more polls like this one folded into it (a flood) ...
    repeats_since: float | None = None  # ... the first of them at this time




_LONGEST_SECONDS = 100 * 366 * 86400


def parse_duration(text: str) -> float:
    """`30m`, `12h`, `7d`, `2w` (or `1d12h`) as seconds (durations.py).

    Raises InventoryError, saying how to write one, for anything else, including a bare number
    and zero.
    """
    seconds = duration_seconds(text)
    if seconds is None:
        raise InventoryError(f"{text!r} is not a duration: {HOW}")
    if seconds <= 0:
        raise InventoryError(f"{text!r} is not a duration: it must be longer than zero")
    if seconds > _LONGEST_SECONDS:
        raise InventoryError(f"{text!r} is longer than the inventory's history could be (100 years)")
    return seconds


_DEVICE_COLUMNS = [devices.c[f.name] for f in fields(Device)]
_POLL_COLUMNS = [polls.c[f.name] for f in fields(Poll)]

# Far beyond any fleet's need, and small enough for every database's integer.
MAX_LIMIT = 1_000_000


def check_status(status: int | None) -> None:
    """Raise InventoryError unless `status` is None or an HTTP status (100 to 599)."""
    if status is not None and not 100 <= status <= 599:
        raise InventoryError(f"status {status} is no HTTP status: give one from 100 to 599, like 403")


def check_limit(limit: int) -> None:
    """Raise InventoryError unless 1 <= `limit` <= MAX_LIMIT."""
    if not 1 <= limit <= MAX_LIMIT:
        raise InventoryError(f"limit must be from 1 to {MAX_LIMIT:,}, not {limit}")


def devices_query(
    *,
    model: str | None = None,
    since: float | None = None,
    status: int | None = None,
    stale: float | None = None,
    now: float | None = None,
) -> sa.Select[Any]:
    """The SELECT for devices matching every filter given, most recently seen first.

    Each filter and the order are served by one index of `devices` (see _database): the rows
    come out in the order they are printed, with no sort of the whole table first.
    """
    check_status(status)
    now = time.time() if now is None else now
    query = sa.select(*_DEVICE_COLUMNS).order_by(devices.c.last_seen.desc(), devices.c.device.desc())
    if model is not None:
        query = query.where(sa.func.lower(devices.c.model) == model.lower())
    if since is not None:
        query = query.where(devices.c.last_seen >= now - since)
    if stale is not None:
        query = query.where(devices.c.last_seen < now - stale)
    if status is not None:
        query = query.where(devices.c.status == status)
    return query


async def select_devices(engine: AsyncEngine, **filters: Any) -> list[Device]:
    """Devices matching every filter of `devices_query`, most recently seen first.

    `model` compares case-insensitively; `since` keeps devices seen within that many seconds,
    `stale` those not seen for at least that many; `status` is the newest poll's HTTP status.
    """
    return [device async for device in stream_devices(engine, **filters)]


async def stream_devices(engine: AsyncEngine, *, chunk: int = 2000, **filters: Any) -> AsyncIterator[Device]:
    """Like `select_devices`, one device at a time as the database hands them over: a server-side
    cursor, `chunk` rows in memory at once, whatever the size of the fleet."""
    query = devices_query(**filters)
    async with engine.connect() as connection:
        result = await connection.stream(query.execution_options(yield_per=chunk))
        async for rows in result.partitions():
            for row in rows:
                yield Device(*row)


def stream_sqlite_devices(engine: sa.Engine, *, chunk: int = 2000, **filters: Any) -> Iterator[Device]:
    """`stream_devices` through a blocking SQLite engine (see `open_sqlite_reader`).

    The driver's own cursor, not SQLAlchemy's result: its rows are already the tuples a Device
    takes, and a million of them through the result's per-row machinery cost two seconds more.
    """
    compiled = devices_query(**filters).compile(dialect=engine.dialect)
    parameters = [compiled.params[name] for name in compiled.positiontup or ()]
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        cursor.execute(str(compiled), parameters)
        while rows := cursor.fetchmany(chunk):
            for row in rows:
                yield Device(*row)
        cursor.close()
    finally:
        connection.close()


async def select_history(engine: AsyncEngine, device: str, *, limit: int = 20) -> list[Poll]:
    """The polls of one device, newest first, at most `limit`.

    `device` is a hwid (any case) or a MAC as `00-90-33-30-00-af`, `00:90:33:30:00:af` or
    `0090333000af`. An unknown device has no polls: the answer is an empty list. Polls its
    certificate only claimed are included (`Poll.claimed`), also for a device never admitted.
    """
    check_limit(limit)
    text = device.strip()
    async with engine.connect() as connection:
        keys = list((await connection.execute(history_keys_query(text))).scalars())
        keys = keys or _history_guesses(text)
        return [Poll(*row) for row in await connection.execute(history_query(keys, limit))]


def history_keys_query(text: str) -> sa.Select[Any]:
    """The inventory keys (`devices.device`) that `history TEXT` means, by indexed columns only:
    the MAC, or the hwid's stored key (never lower(hwid), which no index could serve)."""
    mac = normalize_mac(text)
    key = mac if mac is not None else (hwid_key(text) or "")
    column = devices.c.mac if mac is not None else devices.c.hwid_key
    return sa.select(devices.c.device).where(sa.or_(column == key, devices.c.device == key))


def _history_guesses(text: str) -> list[str]:
    # A device only ever refused has no inventory row; its polls are keyed by the MAC its
    # certificate's name implies (or the hwid, for a name that implies none).
    mac = normalize_mac(text)
    if mac is not None:
        return [mac]
    key = hwid_key(text) or ""
    try:
        return [parse_device_name(text, {}).mac, key]
    except InvalidDeviceName:
        return [key]


def history_query(keys: list[str], limit: int) -> sa.Select[Any]:
    """The newest `limit` polls under any of `keys`, walking the index on (device, time)."""
    where = polls.c.device.in_(keys) if len(keys) > 1 else polls.c.device == keys[0]
    return sa.select(*_POLL_COLUMNS).where(where).order_by(polls.c.time.desc(), polls.c.id.desc()).limit(limit)
