"""Backups in the inventory's database: versions compressed, kept only when they differ, pruned
to the last N and the retention period; the device's facts; admins' requests; what the
schedule needs to know.

Every upload of one device is stored in one transaction that starts by writing that device's
row: on PostgreSQL the row lock, on SQLite the write lock, makes two nodes (or workers) taking
uploads of the same device at once store one after the other, so the second sees the first's
version and numbers never collide. Nothing here logs, and no error says what a backup holds.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from ..inventory._database import database_url, describe, devices, migrate, open_engine
from ._schedule import REQUEST_SECONDS
from ._tables import backup_devices, backup_requests, backup_versions, device_facts
from ._text import content_digest, decode, lines_changed, meaningful_lines

_INSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}
_COMPRESSION = 6


@dataclass(frozen=True, slots=True)
class Stored:
    """The result of storing one configuration upload."""

    kept: bool                  # False: the same as the newest version, after volatile lines
    number: int                 # the version now newest
    lines_changed: int | None   # against the version before, when kept (None for a first)


@dataclass(frozen=True, slots=True)
class Version:
    """One stored version of a device's configuration (times in unix seconds)."""

    number: int
    stored_at: float
    size: int                   # bytes as uploaded
    lines: int                  # meaningful lines
    lines_changed: int | None   # against the version before it; None for the first


@dataclass(frozen=True, slots=True)
class BackupState:
    """A device's uploads so far, or its absence: for `--missing` and the listing."""

    device: str                 # the MAC
    hwid: str | None
    model: str | None
    last_upload_at: float | None
    last_stored_at: float | None
    uploads: int
    last_seen: float | None     # its newest poll, from the inventory


def _prepared(body: bytes) -> tuple[list[str], str]:
    """The upload's meaningful lines and their digest: the work done before the lock."""
    lines = meaningful_lines(decode(body))
    return lines, content_digest(lines)


def _compressed(body: bytes) -> bytes:
    """The upload as stored: only for a new version (compressing costs some three times the
    reading of the lines, and most uploads are unchanged)."""
    return zlib.compress(body, _COMPRESSION)


def _changes(previous: bytes, lines: list[str]) -> int:
    """Lines changed against the previous version (compressed): linear, done under the lock."""
    return lines_changed(meaningful_lines(decode(zlib.decompress(previous))), lines)


class BackupStore:
    """Backups and facts in the database of the `database` setting (SQLite or PostgreSQL)."""

    def __init__(self, database: str, *, keep: int = 10, retention_days: float = 365, engine: AsyncEngine | None = None) -> None:
        """Check `database` and set up; connects nothing. Raises InventoryError for a bad URL.

        `keep`: versions kept per device; `retention_days`: older versions go, except each
        device's newest, which stays however old it is.
        """
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self._url = database_url(database)
        self._engine = engine if engine is not None else open_engine(self._url)
        self.keep = keep
        self.retention_days = retention_days

    @property
    def database(self) -> str:
        """The database URL, password hidden."""
        return describe(self._url)

    async def migrate(self) -> int:
        """Create or migrate the schema (the inventory's and ours). Returns its version."""
        return await migrate(self._engine)

    async def close(self) -> None:
        await self._engine.dispose()

    # -- uploads ------------------------------------------------------------------------------

    async def store_config(self, *, mac: str, hwid: str, model: str, body: bytes, now: float | None = None) -> Stored:
        """Store one configuration upload of the device `mac` unless it equals the newest
        version once the volatile lines are dropped. A new version prunes the device to `keep`
        versions; an unchanged upload adds none, so it leaves the versions as they are.

        Raises SQLAlchemy's errors when the database fails; then nothing was stored.
        """
        now = time.time() if now is None else now
        # The text work of a large configuration takes milliseconds: off the event loop, where
        # polls are answered, and before the transaction, whose first statement takes the lock
        # every upload (and on SQLite the audit of every poll) waits for. Only the comparison with
        # the newest version, linear in its lines, is left for under the lock. The compression
        # too comes before it, but only for an upload that differs from the newest version as
        # read without the lock: most are unchanged and need none.
        lines, digest = await asyncio.to_thread(_prepared, body)
        compressed = None
        if await self._newest_digest(mac) != digest:
            compressed = await asyncio.to_thread(_compressed, body)
        async with self._engine.begin() as connection:
            await connection.execute(self._touch(connection.dialect.name), {
                "device": mac, "hwid": hwid, "model": model, "first_upload_at": now, "last_upload_at": now,
                "uploads": 1, "updated_at": now,
            })
            newest = (await connection.execute(
                sa.select(backup_versions.c.id, backup_versions.c.number, backup_versions.c.digest)
                .where(backup_versions.c.device == mac)
                .order_by(backup_versions.c.number.desc())
                .limit(1)
            )).first()
            if newest is not None and newest.digest == digest:
                return Stored(False, newest.number, None)
            if compressed is None:   # another upload of the device came in meanwhile: stored after all
                compressed = await asyncio.to_thread(_compressed, body)
            changed = None
            if newest is not None:  # only now the content: most uploads end above, unchanged
                previous = (await connection.execute(
                    sa.select(backup_versions.c.content).where(backup_versions.c.id == newest.id)
                )).scalar()
                changed = await asyncio.to_thread(_changes, previous, lines)
            number = newest.number + 1 if newest is not None else 1
            await connection.execute(sa.insert(backup_versions).values(
                device=mac, number=number, stored_at=now, size=len(body), lines=len(lines),
                lines_changed=changed, digest=digest, content=compressed,
            ))
            await connection.execute(
                backup_devices.update().where(backup_devices.c.device == mac).values(last_stored_at=now)
            )
            await connection.execute(
                backup_versions.delete().where(
                    backup_versions.c.device == mac, backup_versions.c.number <= number - self.keep
                )
            )
            return Stored(True, number, changed)

    async def _newest_digest(self, mac: str) -> str | None:
        """The digest of the device's newest version as read now, outside any transaction (None
        without one): a guess the transaction checks again under the lock."""
        async with self._engine.connect() as connection:
            return (await connection.execute(
                sa.select(backup_versions.c.digest).where(backup_versions.c.device == mac)
                .order_by(backup_versions.c.number.desc()).limit(1)
            )).scalar()

    @staticmethod
    def _touch(dialect: str) -> Any:
        """Insert the device's row or count one more upload: the statement that takes its lock."""
        stmt: Any = _INSERTS[dialect](backup_devices)
        new, old = stmt.excluded, backup_devices.c
        return stmt.on_conflict_do_update(index_elements=[backup_devices.c.device], set_={
            "hwid": new.hwid,
            "model": new.model,
            "last_upload_at": sa.case((new.last_upload_at > old.last_upload_at, new.last_upload_at),
                                      else_=old.last_upload_at),
            "uploads": old.uploads + 1,
            "updated_at": new.updated_at,
        })

    async def store_facts(self, *, mac: str, hwid: str, source: str, facts: dict[str, Any], now: float | None = None) -> None:
        """Keep what the device said about itself (`source`: x509 or cmd0), replacing the last."""
        now = time.time() if now is None else now
        async with self._engine.begin() as connection:
            stmt: Any = _INSERTS[connection.dialect.name](device_facts)
            await connection.execute(
                stmt.on_conflict_do_update(
                    index_elements=[device_facts.c.device, device_facts.c.source],
                    set_={"hwid": stmt.excluded.hwid, "reported_at": stmt.excluded.reported_at,
                          "facts": stmt.excluded.facts},
                ),
                {"device": mac, "source": source, "hwid": hwid, "reported_at": now, "facts": facts},
            )

    # -- reading ------------------------------------------------------------------------------

    async def versions(self, mac: str) -> list[Version]:
        """The device's stored versions, newest first."""
        query = (
            sa.select(backup_versions.c.number, backup_versions.c.stored_at, backup_versions.c.size,
                      backup_versions.c.lines, backup_versions.c.lines_changed)
            .where(backup_versions.c.device == mac)
            .order_by(backup_versions.c.number.desc())
        )
        async with self._engine.connect() as connection:
            return [Version(*row) for row in await connection.execute(query)]

    async def content(self, mac: str, number: int) -> bytes | None:
        """One version as the device uploaded it, or None when there is no such version."""
        query = sa.select(backup_versions.c.content).where(
            backup_versions.c.device == mac, backup_versions.c.number == number
        )
        async with self._engine.connect() as connection:
            compressed = (await connection.execute(query)).scalar()
        return zlib.decompress(compressed) if compressed is not None else None

    async def facts(self, mac: str) -> dict[str, tuple[float, dict[str, Any]]]:
        """The device's facts by source: {source: (reported_at, facts)}."""
        query = sa.select(device_facts.c.source, device_facts.c.reported_at, device_facts.c.facts).where(
            device_facts.c.device == mac
        )
        async with self._engine.connect() as connection:
            return {row.source: (row.reported_at, row.facts) for row in await connection.execute(query)}

    async def state(self, mac: str) -> BackupState | None:
        """The device's upload counters, or None when it never uploaded."""
        query = sa.select(backup_devices).where(backup_devices.c.device == mac)
        async with self._engine.connect() as connection:
            row = (await connection.execute(query)).first()
        if row is None:
            return None
        return BackupState(row.device, row.hwid, row.model, row.last_upload_at, row.last_stored_at, row.uploads, None)

    async def missing(self, older_than: float, now: float | None = None) -> list[BackupState]:
        """Devices with no upload for `older_than` seconds: those that uploaded longer ago, and
        those the inventory has known that long that never uploaded. Longest missing first."""
        now = time.time() if now is None else now
        cutoff = now - older_than
        uploaded = (
            sa.select(backup_devices, devices.c.last_seen)
            .select_from(backup_devices.outerjoin(devices, devices.c.device == backup_devices.c.device))
            .where(backup_devices.c.last_upload_at < cutoff)
        )
        never = (
            sa.select(devices.c.device, devices.c.hwid, devices.c.model, devices.c.last_seen)
            .select_from(devices.outerjoin(backup_devices, devices.c.device == backup_devices.c.device))
            .where(backup_devices.c.device.is_(None), devices.c.hwid.is_not(None), devices.c.first_seen < cutoff)
        )
        async with self._engine.connect() as connection:
            found = [
                BackupState(row.device, row.hwid, row.model, row.last_upload_at, row.last_stored_at, row.uploads,
                            row.last_seen)
                for row in await connection.execute(uploaded)
            ]
            found += [
                BackupState(row.device, row.hwid, row.model, None, None, 0, row.last_seen)
                for row in await connection.execute(never)
            ]
        return sorted(found, key=lambda state: (state.last_upload_at or 0.0, state.device))

    # -- the schedule -------------------------------------------------------------------------

    async def request(self, targets: Iterable[str], now: float | None = None) -> None:
        """Ask the devices named by `targets` (see `_schedule`) for their configuration now."""
        now = time.time() if now is None else now
        rows = [{"target": target, "requested_at": now} for target in sorted(set(targets))]
        if not rows:
            return
        async with self._engine.begin() as connection:
            stmt: Any = _INSERTS[connection.dialect.name](backup_requests)
            await connection.execute(
                stmt.on_conflict_do_update(index_elements=[backup_requests.c.target],
                                           set_={"requested_at": stmt.excluded.requested_at}),
                rows,
            )

    async def uploads_since(self, since: float) -> dict[str, float]:
        """{device: last_upload_at} for devices whose row changed at or after `since`."""
        query = sa.select(backup_devices.c.device, backup_devices.c.last_upload_at).where(
            backup_devices.c.updated_at >= since
        )
        async with self._engine.connect() as connection:
            return {row.device: row.last_upload_at for row in await connection.execute(query)}

    async def requests(self, now: float | None = None) -> dict[str, float]:
        """{target: requested_at} for the requests still in force."""
        now = time.time() if now is None else now
        query = sa.select(backup_requests).where(backup_requests.c.requested_at > now - REQUEST_SECONDS)
        async with self._engine.connect() as connection:
            return {row.target: row.requested_at for row in await connection.execute(query)}

    # -- retention ----------------------------------------------------------------------------

    async def purge(self, now: float | None = None) -> int:
        """Delete versions older than the retention period (but never a device's newest) and
        requests no longer in force. Returns how many versions went."""
        now = time.time() if now is None else now
        newer = backup_versions.alias("newer")
        has_newer = sa.exists().where(newer.c.device == backup_versions.c.device,
                                      newer.c.number > backup_versions.c.number)
        async with self._engine.begin() as connection:
            result = await connection.execute(backup_versions.delete().where(
                backup_versions.c.stored_at < now - self.retention_days * 86400, has_newer,
            ))
            await connection.execute(backup_requests.delete().where(
                backup_requests.c.requested_at <= now - REQUEST_SECONDS
            ))
        return result.rowcount
