"""From a poll record to database rows: untrusted text made storable, device facts derived."""

from __future__ import annotations

import functools
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ..identity import normalize_mac
from ..innovaphone import reported_build
from ..outcome import Outcome
from ._database import devices, polls

# What the device says about itself is kept, but bounded: a device (or anyone holding its
# certificate) must not be able to fill the database through its query string.
MAX_QUERY_ARGS = 64
MAX_QUERY_KEY = 128
MAX_QUERY_VALUE = 1024
MAX_TEXT = 2048

# Per-device columns and the poll they come from: the newest one, the newest one that was served
# a script, the newest one in which the device reported its versions.
IDENTITY = ("hwid", "mac", "model", "hwid_key")
LATEST = ("status", "reason", "path", "client_ip")
SERVED = ("template", "script_sha256")
REPORTED = ("firmware", "boot", "version", "local_ip")


def clean_text(value: Any, limit: int = MAX_TEXT) -> str | None:
    """`value` as text any database stores: no NUL, no lone surrogates, at most `limit` characters."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit and text.isascii() and "\x00" not in text:
        return text  # the common case, checked in C
    text = text[:limit].replace("\x00", "\ufffd")
    return text.encode("utf-8", "replace").decode("utf-8")


def clean_query(query: Any) -> dict[str, str]:
    """The device's query arguments, bounded and storable. Anything but a mapping becomes `{}`."""
    if not isinstance(query, dict):
        return {}
    cleaned: dict[str, str] = {}
    for key, value in list(query.items())[:MAX_QUERY_ARGS]:
        if isinstance(value, (list, tuple)):
            value = value[0] if value else ""
        cleaned[clean_text(key, MAX_QUERY_KEY) or ""] = clean_text(value, MAX_QUERY_VALUE) or ""
    return cleaned


def reported_facts(query: dict[str, str]) -> dict[str, str | None]:
    """Firmware, boot code, version text and own IP address as the device reported them.

    innovaphone devices append `PROT` (firmware build, e.g. `13A127`), `BOOT` (boot code build)
    and `ver` (`13r1 dvl IP811[13.A127], Bootcode[113454], Hardware[300]`); `ip` is what an
    update URL with `ip=#i` adds. `PROT`/`BOOT` win; `ver` fills in when they are missing or empty.
    """
    lowered = {key.lower(): value for key, value in query.items()}
    version = lowered.get("ver") or None
    return {
        "firmware": stored_build(query, "prot"),
        "boot": stored_build(query, "boot"),
        "version": clean_text(version, 256),
        "local_ip": clean_text(lowered.get("ip") or None, 64),
    }


def stored_build(query: dict[str, str], kind: str) -> str | None:
    """The firmware (`prot`) or boot code (`boot`) build the device reported, as stored: read as
    the firmware rollout reads it too (innovaphone.reported_build), bounded."""
    return clean_text(reported_build(query, kind), 128)


def inventory_key(hwid: str | None, mac: str | None) -> str | None:
    """The key of a device's row in the inventory (`devices.device`, `polls.device`): its MAC
    when known, else its lower-case hwid. Not the key that picks its template."""
    if mac:
        return normalize_mac(mac) or mac.lower()
    if hwid:
        return hwid.lower()
    return None


def _widths(table: sa.Table) -> dict[str, int]:
    return {column.name: getattr(column.type, "length", None) or MAX_TEXT for column in table.c}


_WIDTHS = {table.name: _widths(table) for table in (polls, devices)}
assert all(
    _WIDTHS["devices"][name] >= width for name, width in _WIDTHS["polls"].items() if name in _WIDTHS["devices"]
), "an inventory column is narrower than the audit column it is copied from"


def _fit(table: sa.Table, row: dict[str, Any]) -> dict[str, Any]:
    """Cut text to its column's width: PostgreSQL refuses what SQLite would take."""
    widths = _WIDTHS[table.name]
    for name, value in row.items():
        # inline test of the common case: a call per column would be most of a row's cost
        if isinstance(value, str) and (len(value) > widths[name] or not value.isascii() or "\x00" in value):
            row[name] = clean_text(value, widths[name])
    return row


def hwid_key(hwid: str | None) -> str | None:
    """A hwid as `devices.hwid_key` holds it and `history` looks it up."""
    return hwid.lower() if hwid else None


def poll_row(record: Outcome, repeats: int = 0, repeats_since: float | None = None) -> dict[str, Any]:
    """The audit row of one poll (a dict for `polls`). Raises only on a record that is not one.

    `repeats` more polls like this one, the first at `repeats_since`, are folded into the row.
    """
    query = clean_query(record.query)
    mac = (normalize_mac(record.mac) or record.mac) if record.mac else None
    return _fit(polls, {
        "time": float(record.time),
        "device": inventory_key(record.hwid, mac),
        "hwid": record.hwid,
        "mac": mac,
        "model": record.model,
        "client_ip": record.client_ip,
        "path": record.path or "",
        "status": int(record.status),
        "reason": record.reason,
        "detail": record.detail,
        "template": record.template,
        "script_sha256": record.script_sha256,
        "decision": record.decision,
        "check_reported": record.check_reported,
        "check_digest": record.check_digest,
        "firmware": stored_build(query, "prot"),
        "duration_ms": float(record.duration_ms or 0.0),
        "query": query,
        "claimed": record.claimed,
        "repeats": int(repeats),
        "repeats_since": float(repeats_since) if repeats else None,
    })


def likeness(record: Outcome) -> tuple[Any, ...]:
    """What makes two polls of one device "polls like this" that a flood may fold into one row.

    The same device with the same outcome, and (claimed or not) the same proof of who it is:
    a device's clean poll never folds into a flood of refusals its certificate only claimed.
    """
    return (
        record.hwid, record.mac, record.status, record.reason, record.template, record.decision,
        record.claimed,
    )


def device_row(poll: dict[str, Any]) -> dict[str, Any] | None:
    """The inventory row one audit row stands for; None for a poll that showed no identity, or
    only claimed one (such a poll is in the device's history, but proves nothing about it)."""
    if poll["device"] is None or poll["claimed"]:
        return None
    served = poll["script_sha256"] is not None
    reported = reported_facts(poll["query"])
    # No _fit here: every text comes from the audit row, already fitted to columns no wider
    # than these (checked below, at import), or from reported_facts, which fits its own.
    return {
        "device": poll["device"],
        **{name: poll[name] for name in ("hwid", "mac", "model") + LATEST},
        "hwid_key": hwid_key(poll["hwid"]),
        "first_seen": poll["time"],
        "last_seen": poll["time"],
        "served_at": poll["time"] if served else None,
        "template": poll["template"] if served else None,
        "script_sha256": poll["script_sha256"],
        "reported_at": poll["time"] if any(reported.values()) else None,
        **reported,
    }


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Two inventory rows of one device as one, whatever order their polls came in.

    The same rule as `upsert` below applies in the database; this one folds a batch first, since
    one INSERT ... ON CONFLICT may touch each row only once.
    """
    out = dict(old)
    out["first_seen"] = min(old["first_seen"], new["first_seen"])
    if new["last_seen"] >= old["last_seen"]:
        out["last_seen"] = new["last_seen"]
        out.update({name: new[name] for name in LATEST})
        out.update({name: new[name] if new[name] is not None else old[name] for name in IDENTITY})
    for stamp, names in (("served_at", SERVED), ("reported_at", REPORTED)):
        if new[stamp] is not None and (old[stamp] is None or new[stamp] >= old[stamp]):
            out[stamp] = new[stamp]
            out.update({name: new[name] if new[name] is not None else old[name] for name in names})
    return out


_INSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}


@functools.cache   # built once per dialect: SQLAlchemy then keeps its compiled form by the statement's cache key
def upsert(dialect: str) -> Any:
    """INSERT ... ON CONFLICT for `devices` that keeps each column from the poll it belongs to.

    Safe with several writers: every column compares the incoming poll's time with the stored
    one, so a late batch from another instance never overwrites newer facts.
    """
    stmt: Any = _INSERTS[dialect](devices)  # both dialects: on_conflict_do_update, excluded
    new, old = stmt.excluded, devices.c
    newer = new.last_seen >= old.last_seen
    values: dict[str, Any] = {
        "first_seen": sa.case((new.first_seen < old.first_seen, new.first_seen), else_=old.first_seen),
        "last_seen": sa.case((newer, new.last_seen), else_=old.last_seen),
    }
    values.update({name: sa.case((newer, new[name]), else_=old[name]) for name in LATEST})
    values.update(
        {name: sa.case((newer, sa.func.coalesce(new[name], old[name])), else_=old[name]) for name in IDENTITY}
    )
    for stamp, names in (("served_at", SERVED), ("reported_at", REPORTED)):
        take = sa.and_(new[stamp].is_not(None), sa.or_(old[stamp].is_(None), new[stamp] >= old[stamp]))
        values[stamp] = sa.case((take, new[stamp]), else_=old[stamp])
        values.update(
            {name: sa.case((take, sa.func.coalesce(new[name], old[name])), else_=old[name]) for name in names}
        )
    return stmt.on_conflict_do_update(index_elements=[devices.c.device], set_=values)


Folded = tuple[Outcome, int, "float | None"]  # a poll, how many more like it, the first one's time


def fold_floods(records: list[Outcome], flood: int, gap: float = 1.0) -> list[Folded]:
    """A batch of polls with every flood folded into one row.

    A flood is a run of more than `flood` polls alike (see `likeness`), each less than `gap`
    seconds after the one before; it becomes its newest poll, counting the others and keeping
    the time of the first. A device polling every few minutes never floods, not even in the
    backlog of an outage: its polls, and every other device's, stay one row each.
    """
    groups: dict[Any, list[Outcome]] = {}
    for record in records:
        try:
            key = likeness(record)
            float(record.time)
        except Exception:  # noqa: BLE001 - not a poll record: poll_row will reject it, alone
            key = ("not a poll", id(record))
        groups.setdefault(key, []).append(record)
    folded: list[Folded] = []
    for group in groups.values():
        if len(group) <= flood:
            folded.extend((record, 0, None) for record in group)
            continue
        group.sort(key=lambda record: record.time)
        run = [group[0]]
        for record in group[1:] + [None]:
            if record is not None and record.time - run[-1].time < gap:
                run.append(record)
                continue
            if len(run) > flood:
                folded.append((run[-1], len(run) - 1, run[0].time))
            else:
                folded.extend((member, 0, None) for member in run)
            run = [record]
    return folded
