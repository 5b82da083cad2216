"""Asking the inventory about the fleet: devices by filter, one device's polls, durations."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, fields
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from ..identity import normalize_mac
from ._database import InventoryError, devices, polls


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


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> float:
    """`30m`, `12h`, `7d`, `2w` (or `1d12h`) as seconds.

    Units: s, m (minutes), h, d, w. Raises InventoryError, saying how to write one, for anything
    else, including a bare number and zero.
    """
    compact = text.strip().lower().replace(" ", "")
    if not _DURATION.fullmatch(compact):
        raise InventoryError(
            f"{text!r} is not a duration: write a number and a unit, like 30m, 12h, 7d or 2w "
            "(s seconds, m minutes, h hours, d days, w weeks)"
        )
    seconds = sum(float(number) * _UNITS[unit] for number, unit in _DURATION_PART.findall(compact))
    if seconds <= 0:
        raise InventoryError(f"{text!r} is not a duration: it must be longer than zero")
    return seconds


def _device(row: sa.Row[Any]) -> Device:
    return Device(**{f.name: row._mapping[f.name] for f in fields(Device)})


def _poll(row: sa.Row[Any]) -> Poll:
    return Poll(**{f.name: row._mapping[f.name] for f in fields(Poll)})


async def select_devices(
    engine: AsyncEngine,
    *,
    model: str | None = None,
    since: float | None = None,
    status: int | None = None,
    stale: float | None = None,
    now: float | None = None,
) -> list[Device]:
    """Devices matching every filter given, most recently seen first.

    `model` compares case-insensitively; `since` keeps devices seen within that many seconds,
    `stale` those not seen for at least that many; `status` is the newest poll's HTTP status.
    """
    now = time.time() if now is None else now
    query = sa.select(devices).order_by(devices.c.last_seen.desc(), devices.c.device)
    if model is not None:
        query = query.where(sa.func.lower(devices.c.model) == model.lower())
    if since is not None:
        query = query.where(devices.c.last_seen >= now - since)
    if stale is not None:
        query = query.where(devices.c.last_seen < now - stale)
    if status is not None:
        query = query.where(devices.c.status == status)
    async with engine.connect() as connection:
        return [_device(row) for row in await connection.execute(query)]


async def select_history(engine: AsyncEngine, device: str, *, limit: int = 20) -> list[Poll]:
    """The polls of one device, newest first, at most `limit`.

    `device` is a hwid (any case) or a MAC as `00-90-33-30-00-af`, `00:90:33:30:00:af` or
    `0090333000af`. An unknown device has no polls: the answer is an empty list.
    """
    if limit < 1:
        raise InventoryError(f"limit must be at least 1, not {limit}")
    text = device.strip()
    mac = normalize_mac(text)
    if mac is not None:
        match = sa.or_(devices.c.mac == mac, devices.c.device == mac)
    else:
        match = sa.or_(sa.func.lower(devices.c.hwid) == text.lower(), devices.c.device == text.lower())
    async with engine.connect() as connection:
        keys = list((await connection.execute(sa.select(devices.c.device).where(match))).scalars())
        keys = keys or [mac or text.lower()]
        query = (
            sa.select(polls)
            .where(polls.c.device.in_(keys))
            .order_by(polls.c.time.desc(), polls.c.id.desc())
            .limit(limit)
        )
        return [_poll(row) for row in await connection.execute(query)]
