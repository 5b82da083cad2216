"""What the admin page asks the inventory: a page of the fleet, the problems, one device.

Read only. Filtering, sorting and paging happen in the database, each on an index, so a page
costs the same at 100,000 devices as at ten. Paging is by key ("after this row"), not by
offset: the next page starts where the index left off instead of counting past every row before.
"""

from __future__ import annotations

import base64
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from ..backups import backup_devices
from ..firmware import Halt, RolloutState
from ..inventory._database import devices, polls

PAGE_SIZE = 50
DAY = 86400.0

Sort = Literal["last_seen", "status", "model", "hwid"]

# Each order is an index's column order (`_database.py`), ending in the primary key, so that a
# row's values in these columns are unique and say where the next page starts.
SORTS: dict[str, tuple[Any, ...]] = {
    "last_seen": (devices.c.last_seen, devices.c.device),
    "status": (devices.c.status, devices.c.last_seen, devices.c.device),
    "model": (sa.func.lower(devices.c.model), devices.c.last_seen, devices.c.device),
    "hwid": (devices.c.hwid_key, devices.c.device),
}
SORT_LABELS = {"last_seen": "last seen", "status": "status", "model": "model", "hwid": "hwid"}
# What a cursor may hold for each column of an order: a number for a time, a 32-bit integer for
# a status (the column's INTEGER), a text for a name (PostgreSQL compares no text with a number)
_TIME, _STATUS, _TEXT = "time", "status", "text"
_CURSOR_KINDS: dict[str, tuple[str, ...]] = {
    "last_seen": (_TIME, _TEXT),
    "status": (_STATUS, _TIME, _TEXT),
    "model": (_TEXT, _TIME, _TEXT),
    "hwid": (_TEXT, _TEXT),
}


@dataclass(frozen=True, slots=True)
class FleetFilter:
    """What the admin asked the fleet page for. Every field narrows; None means any."""

    model: str | None = None
    status: int | None = None
    stale: float | None = None        # not seen for at least this many seconds
    text: str | None = None           # part of hwid, MAC, model, template, firmware or address
    no_backup: float | None = None    # no configuration backup uploaded for this many seconds (or ever)
    sort: Sort = "last_seen"
    descending: bool = True


@dataclass(frozen=True, slots=True)
class FleetRow:
    """One device on the fleet page. Times are unix seconds; reported facts are the device's word."""

    key: str                    # devices.device: the MAC, or the lower-case hwid
    hwid: str | None
    mac: str | None
    model: str | None
    last_seen: float
    status: int
    reason: str | None
    template: str | None
    firmware: str | None
    served_at: float | None
    applied: str | None = None  # "applied", "sent" (not yet confirmed), or None (no apply-once)
    backup_at: float | None = None  # its last configuration upload, None when it never uploaded


@dataclass(frozen=True, slots=True)
class FleetPage:
    rows: list[FleetRow]
    total: int                   # devices matching the filter
    after: str | None = None     # cursor of the next page, None on the last
    before: str | None = None    # cursor of the previous page, None on the first


def _cursor(row: sa.Row[Any], sort: str) -> str:
    values = [row._mapping[f"_k{i}"] for i in range(len(SORTS[sort]))]
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


def read_cursor(text: str | None, sort: str) -> list[Any] | None:
    """The values a cursor holds, or None for a cursor that is absent or not one of ours (a
    hand-edited URL gets the first page, not an error): each of its column's kind, and a number
    one every database can compare (a finite time, a status within 32 bits)."""
    if not text:
        return None
    try:
        values = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, TypeError):
        return None
    if not isinstance(values, list) or len(values) != len(SORTS[sort]):
        return None
    if not all(_cursor_value(v, kind) for v, kind in zip(values, _CURSOR_KINDS[sort])):
        return None
    return values


def _cursor_value(value: Any, kind: str) -> bool:
    if kind == _TEXT:
        return isinstance(value, str)
    if isinstance(value, bool):
        return False
    if kind == _STATUS:
        return isinstance(value, int) and -(2**31) <= value < 2**31
    return (isinstance(value, int) and -(2**63) <= value < 2**63) or (isinstance(value, float) and math.isfinite(value))


def _like(text: str) -> str:
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def filtered(fleet: FleetFilter, now: float) -> list[Any]:
    """The WHERE terms of `fleet`, written the way the indexes are (lower(model), status, last_seen)."""
    terms: list[Any] = []
    if fleet.model:
        terms.append(sa.func.lower(devices.c.model) == fleet.model.lower())
    if fleet.status is not None:
        terms.append(devices.c.status == fleet.status)
    if fleet.stale is not None:
        terms.append(devices.c.last_seen < now - fleet.stale)
    if fleet.no_backup is not None:
        # One lookup of the device's backup row (its primary key) per device the page walks.
        terms.append(~sa.exists().where(
            backup_devices.c.device == devices.c.device,
            backup_devices.c.last_upload_at >= now - fleet.no_backup,
        ))
    if fleet.text:
        # Part of a name can use no index: see SORT_MATCHES_BELOW for how the page is then read.
        # hwid_key, mac and client_ip are stored in lower case already: no lower() per row.
        pattern = _like(fleet.text.strip())
        terms.append(sa.or_(
            *(column.like(pattern, escape="\\") for column in (devices.c.hwid_key, devices.c.mac, devices.c.client_ip)),
            *(sa.func.lower(column).like(pattern, escape="\\")
              for column in (devices.c.model, devices.c.template, devices.c.firmware)),
        ))
    return terms


# A free-text filter matching fewer devices than this is read by one scan of the table and its
# matches sorted (a few thousand rows at most); walking the order's index instead would visit
# most of the table in random order before a page of rare matches is full. More matches than
# this, and the index walk fills a page after reading at most devices / SORT_MATCHES_BELOW * 51
# rows. The count the page shows anyway tells which case it is.
SORT_MATCHES_BELOW = 5000


def page_query(fleet: FleetFilter, now: float, *, after: list[Any] | None = None,
               before: list[Any] | None = None, limit: int = PAGE_SIZE,
               sort_matches: bool = False) -> sa.Select[Any]:
    """The SELECT of one page (one row more than `limit`, to tell whether another page follows).

    `after` continues past a row in the page's order, `before` walks back from one (the rows
    then come in reverse order). `sort_matches` keeps the database from walking the order's
    index: it finds the matches first and sorts them (for a rare free text).
    """
    keys = SORTS[fleet.sort]
    descending = fleet.descending if before is None else not fleet.descending
    query = sa.select(
        devices.c.device, devices.c.hwid, devices.c.mac, devices.c.model, devices.c.last_seen,
        devices.c.status, devices.c.reason, devices.c.template, devices.c.firmware, devices.c.served_at,
        backup_at_column().label("backup_at"),
        *(key.label(f"_k{i}") for i, key in enumerate(keys)),
    ).where(*filtered(fleet, now))
    start = after if after is not None else before
    if start is not None:
        row, cut = sa.tuple_(*keys), sa.tuple_(*(sa.literal(v) for v in start))
        query = query.where(row < cut if descending else row > cut)
    # coalesce(k, k) is k, but no index is ordered by it
    ordered = [sa.func.coalesce(key, key) for key in keys] if sort_matches else list(keys)
    order = [key.desc() if descending else key.asc() for key in ordered]
    return query.order_by(*order).limit(limit + 1)


def backup_at_column() -> Any:
    """The device's last backup upload, as a column of its row: a lookup of the backup table's
    primary key for each row the page returns, which leaves the walk of the order's index as it is
    (a join could tempt a planner to read both tables whole)."""
    return (
        sa.select(backup_devices.c.last_upload_at)
        .where(backup_devices.c.device == devices.c.device)
        .scalar_subquery()
    )


def count_query(fleet: FleetFilter, now: float) -> sa.Select[Any]:
    return sa.select(sa.func.count()).select_from(devices).where(*filtered(fleet, now))


def applied_query(keys: list[str]) -> sa.Select[Any]:
    """The newest served poll's apply-once decision of each device in `keys` (one page's)."""
    latest = polls.alias("latest")
    newest = (
        sa.select(sa.func.max(latest.c.time))
        .where(latest.c.device == polls.c.device, latest.c.script_sha256.is_not(None))
        .scalar_subquery()
    )
    return (
        sa.select(polls.c.device, polls.c.decision)
        .where(polls.c.device.in_(keys), polls.c.script_sha256.is_not(None), polls.c.time == newest)
    )


async def fleet_page(engine: AsyncEngine, fleet: FleetFilter, *, now: float | None = None,
                     after: str | None = None, before: str | None = None, limit: int = PAGE_SIZE) -> FleetPage:
    """One page of devices matching `fleet`, in its order, starting after (or ending before) a cursor."""
    now = time.time() if now is None else now
    start_after, end_before = read_cursor(after, fleet.sort), read_cursor(before, fleet.sort)
    if start_after is not None:
        end_before = None
    async with engine.connect() as connection:
        total = (await connection.execute(count_query(fleet, now))).scalar_one()
        sort_matches = bool(fleet.text) and total < SORT_MATCHES_BELOW
        query = page_query(fleet, now, after=start_after, before=end_before, limit=limit, sort_matches=sort_matches)
        found = list(await connection.execute(query))
        more = len(found) > limit
        found = found[:limit]
        if end_before is not None:
            found.reverse()
        decisions: dict[str, str | None] = {}
        if found:
            page_keys = [row.device for row in found]
            decisions = {row.device: row.decision for row in await connection.execute(applied_query(page_keys))}
    rows = [FleetRow(
        key=row.device, hwid=row.hwid, mac=row.mac, model=row.model, last_seen=row.last_seen,
        status=row.status, reason=row.reason, template=row.template, firmware=row.firmware,
        served_at=row.served_at, applied=_applied(decisions.get(row.device)), backup_at=row.backup_at,
    ) for row in found]
    if end_before is not None:
        next_cursor = _cursor(found[-1], fleet.sort) if found else None
        previous = _cursor(found[0], fleet.sort) if more else None
    else:
        next_cursor = _cursor(found[-1], fleet.sort) if more else None
        previous = _cursor(found[0], fleet.sort) if start_after is not None and found else None
    return FleetPage(rows, total, next_cursor, previous)


def _applied(decision: str | None) -> str | None:
    return {"unchanged": "applied", "sent": "sent"}.get(decision or "")


@dataclass(frozen=True, slots=True)
class Refusals:
    reason: str
    polls: int        # refused polls (a folded flood counts every poll in it)
    devices: int      # distinct devices named (or claimed) by them
    clients: int      # distinct client addresses


@dataclass(frozen=True, slots=True)
class Summary:
    """Problems first: what the top of the fleet page shows."""

    devices: int
    refused: list[Refusals]           # in the last day, by reason
    configuration_errors: int         # devices whose newest poll got 500
    no_configuration: int             # devices whose newest poll got 404
    stale: int                        # devices not seen for `stale_after`
    stale_after: float
    halted: list[Halt] = field(default_factory=list)   # firmware rollouts halted, by model and kind


def refusals_query(since: float) -> sa.Select[Any]:
    """Refused polls since `since`, by reason: a range of the (status, time) index."""
    return (
        sa.select(
            polls.c.reason,
            sa.func.sum(1 + polls.c.repeats).label("polls"),
            sa.func.count(sa.distinct(polls.c.device)).label("devices"),
            sa.func.count(sa.distinct(polls.c.client_ip)).label("clients"),
        )
        .where(polls.c.status == 403, polls.c.time >= since)
        .group_by(polls.c.reason)
        .order_by(sa.desc("polls"), polls.c.reason)
    )


def status_count_query(status: int) -> sa.Select[Any]:
    return sa.select(sa.func.count()).select_from(devices).where(devices.c.status == status)


async def summary(engine: AsyncEngine, *, stale_after: float = DAY, now: float | None = None) -> Summary:
    """The fleet's problems now: refusals of the last day, devices in error, devices gone quiet."""
    now = time.time() if now is None else now
    async with engine.connect() as connection:
        total = (await connection.execute(sa.select(sa.func.count()).select_from(devices))).scalar_one()
        refused = [Refusals(row.reason or "unknown", int(row.polls), row.devices, row.clients)
                   for row in await connection.execute(refusals_query(now - DAY))]
        errors = (await connection.execute(status_count_query(500))).scalar_one()
        missing = (await connection.execute(status_count_query(404))).scalar_one()
        stale = (await connection.execute(count_query(FleetFilter(stale=stale_after), now))).scalar_one()
    halted = await RolloutState(engine).halt_records()   # a handful of rows at most
    return Summary(total, refused, errors, missing, stale, stale_after, halted)


@dataclass(frozen=True, slots=True)
class PollRow:
    time: float
    client_ip: str | None
    path: str
    status: int
    reason: str | None
    detail: str | None
    template: str | None
    decision: str | None
    check_reported: str | None
    firmware: str | None
    claimed: bool
    repeats: int
    query: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    key: str
    hwid: str | None
    mac: str | None
    model: str | None
    first_seen: float
    last_seen: float
    status: int
    reason: str | None
    path: str | None
    client_ip: str | None
    served_at: float | None
    template: str | None
    script_sha256: str | None
    reported_at: float | None
    firmware: str | None
    boot: str | None
    version: str | None
    local_ip: str | None


async def device_facts(engine: AsyncEngine, key: str) -> DeviceFacts | None:
    """The inventory's row of one device (by its key: the MAC, or the lower-case hwid)."""
    columns = [devices.c[name] for name in DeviceFacts.__slots__ if name != "key"]
    query = sa.select(devices.c.device, *columns).where(devices.c.device == key)
    async with engine.connect() as connection:
        row = (await connection.execute(query)).first()
    if row is None:
        return None
    values = row._mapping
    return DeviceFacts(key=values["device"], **{c.name: values[c.name] for c in columns})


def history_query(key: str, limit: int) -> sa.Select[Any]:
    """One device's polls, newest first: a walk down the (device, time) index."""
    return (
        sa.select(polls)
        .where(polls.c.device == key)
        .order_by(polls.c.time.desc(), polls.c.id.desc())
        .limit(limit)
    )


async def device_history(engine: AsyncEngine, key: str, *, limit: int = 50) -> list[PollRow]:
    """The newest `limit` polls of one device, refused ones (and those only claimed) included."""
    async with engine.connect() as connection:
        found = list(await connection.execute(history_query(key, limit)))
    return [PollRow(
        time=row.time, client_ip=row.client_ip, path=row.path, status=row.status, reason=row.reason,
        detail=row.detail, template=row.template, decision=row.decision, check_reported=row.check_reported,
        firmware=row.firmware, claimed=bool(row.claimed), repeats=row.repeats or 0, query=row.query or {},
    ) for row in found]
