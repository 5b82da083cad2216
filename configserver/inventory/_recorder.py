"""Recording polls without slowing them: a bounded queue in front of a batching, retrying writer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from ..outcome import Outcome
from ._database import (
    database_url,
    describe,
    devices,
    explain,
    migrate,
    open_engine,
    polls,
    schema_versions,
)
from ._queries import Device, Poll, select_devices, select_history, stream_devices
from ._rows import Folded, device_row, fold_floods, likeness, merge, poll_row, upsert

if TYPE_CHECKING:
    from ..settings import Settings

log = logging.getLogger("configserver.inventory")

_PURGE_CHUNK = 5000
_DROP_REPORT_SECONDS = 10.0
# More polls than this from one device, alike, in one batch (half a second or less): a flood.
# A device polls every few minutes; a flood is a loop, a script or someone holding its certificate.
FLOOD = 8
# One statement object for every batch (so is the devices upsert, see _rows): compiled once
# per writer, see _Compiled.
_INSERT_POLLS = sa.insert(polls)


class _Compiled(NamedTuple):
    """A batch statement as the database driver takes it: compiled once, for one dialect and
    for executemany (no RETURNING of the new ids), with the order of its parameters and
    SQLAlchemy's own conversion of those that need one (JSON to text, floats, booleans).

    SQLAlchemy works each row of an executemany out anew, about 6 us a row for the audit insert
    and as much for the devices upsert; the rows of a batch all have the same columns, so this
    is done once, and each row becomes a tuple.
    """

    sql: str
    take: Callable[[dict[str, Any]], tuple[Any, ...]]   # a row's values, in the statement's order
    converting: tuple[tuple[int, Callable[[Any], Any]], ...]   # (position, conversion)

    @classmethod
    def of(cls, statement: Any, table: sa.Table, keys: Sequence[str], dialect: Dialect) -> _Compiled | None:
        """None, for SQLAlchemy to bind each row, when the dialect's parameters are named rather
        than positional, or the statement binds more than the rows' own columns (a default)."""
        compiled = statement.compile(dialect=dialect, column_keys=list(keys), for_executemany=True)
        order = compiled.positiontup
        if not order or not set(order) <= set(keys) <= set(table.c.keys()):
            return None
        binds = compiled.binds   # each parameter's own type, as SQLAlchemy would convert it
        converters = (binds[key].type.dialect_impl(dialect).bind_processor(dialect) for key in order)
        getter = operator.itemgetter(*order)
        take = getter if len(order) > 1 else lambda row: (getter(row),)   # itemgetter of one: no tuple
        return cls(str(compiled), take, tuple((index, convert) for index, convert in enumerate(converters) if convert))

    def parameters(self, rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        if not self.converting:
            return [self.take(row) for row in rows]
        bound = []
        for row in rows:
            values = list(self.take(row))
            for index, convert in self.converting:
                values[index] = convert(values[index])
            bound.append(tuple(values))
        return bound


class Inventory:
    """The fleet's inventory and the audit of its polls, in SQLite or PostgreSQL.

    `record()` is all a poll ever touches: it queues and returns. A writer task started by
    `start()` creates or migrates the schema, writes the queue in batches, retries with backoff
    while the database is away, and deletes audit rows older than the retention period.
    """

    def __init__(
        self,
        database: str,
        *,
        retention_days: float = 90,
        queue_size: int = 10000,
        batch_size: int = 2000,
        flush_interval: float = 0.5,
        retry_first: float = 0.5,
        retry_max: float = 10.0,
        retention_interval: float = 3600.0,
    ) -> None:
        """Check `database` (see `database_url`) and set up; connects nothing.

        `queue_size` bounds the polls waiting while the database is slow or away. A full queue
        folds new polls into counted rows, one per device and outcome (at most `queue_size` of
        them); only beyond that are polls dropped (and counted). Raises InventoryError for an
        unusable `database`.
        """
        self._url = database_url(database)
        self._engine = open_engine(self._url)
        self.retention_days = retention_days
        self.queue_size = queue_size
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._retry_first = retry_first
        self._retry_max = retry_max
        self._retention_interval = retention_interval
        # A deque: append and popleft are atomic, so record() is safe from any thread.
        self._queue: deque[Outcome] = deque()
        # What arrives to a full queue: per likeness (see _rows), the newest poll, how many more
        # like it, the first one's time. A flood costs one entry, not the other devices' polls.
        self._overflow: dict[Any, list[Any]] = {}
        self._overflow_polls = 0
        self._overflow_lock = threading.Lock()
        self._compiled: dict[tuple[Any, tuple[str, ...]], _Compiled | None] = {}   # per statement and columns
        self._inflight = 0
        self._written = self._dropped = self._failures = self._rejected = self._folded = 0
        self._dropped_reported = 0
        self._drops_logged_at = 0.0
        self._ready = False
        self._closing = self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **tuning: Any) -> Inventory:
        """The inventory the settings ask for (`database`, `audit_retention_days`, `audit_queue_size`).

        `tuning` passes batch and timing knobs through to the constructor. Raises InventoryError.
        """
        return cls(
            settings.database,
            retention_days=settings.audit_retention_days,
            queue_size=settings.audit_queue_size,
            **tuning,
        )

    @property
    def database(self) -> str:
        """The database URL, password hidden."""
        return describe(self._url)

    # -- the poll path -------------------------------------------------------------------------

    def record(self, record: Outcome) -> None:
        """Queue one poll for the audit and the inventory. Never blocks, never raises.

        When the queue is full (a flood, or the database away for a while) the poll is folded
        into a counted row with the polls like it; when even those are `queue_size` (as many
        devices and outcomes), it is dropped and counted. The writer reports drops in the log.
        """
        try:
            if self._closed:
                self._dropped += 1
            elif len(self._queue) < self.queue_size:
                self._queue.append(record)
                if len(self._queue) == self._batch_size:
                    self._wake()
            else:
                self._hold_over(record)
        except Exception:  # noqa: BLE001 - a poll must never fail because of its audit
            self._dropped += 1

    def _hold_over(self, record: Outcome) -> None:
        key = likeness(record)
        with self._overflow_lock:  # held for a dict update: record() is called from any thread
            held = self._overflow.get(key)
            if held is None:
                if len(self._overflow) >= self.queue_size:
                    self._dropped += 1
                    return
                self._overflow[key] = [record, 0, record.time]
            else:
                held[1] += 1
                held[2] = min(held[2], record.time)
                if record.time >= held[0].time:
                    held[0] = record
            self._overflow_polls += 1

    def _take_overflow(self) -> list[Folded]:
        with self._overflow_lock:
            held, self._overflow, self._overflow_polls = self._overflow, {}, 0
        return [(record, repeats, since) for record, repeats, since in held.values()]

    def stats(self) -> dict[str, int]:
        """Counters for metrics and logs.

        `queued`: polls waiting or being written; `written`: polls stored, as rows of their own
        or `folded` into a counted row with polls like them (a flood, or a full queue);
        `dropped`: lost to a full queue and overflow, or to shutting down with the database
        away; `failures`: failed attempts to reach or write the database; `rejected`: polls the
        database refused even when reachable (logged).
        """
        return {
            "queued": len(self._queue) + self._overflow_polls + self._inflight,
            "written": self._written,
            "folded": self._folded,
            "dropped": self._dropped,
            "failures": self._failures,
            "rejected": self._rejected,
        }

    def _wake(self) -> None:
        loop, wakeup = self._loop, self._wakeup
        if loop is None or wakeup is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        try:
            if running is loop:
                wakeup.set()
            else:
                loop.call_soon_threadsafe(wakeup.set)
        except RuntimeError:  # the loop is closed: the writer is gone anyway
            pass

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the writer task. Returns at once, whether or not the database is up.

        The writer creates or migrates the schema first, retrying in the background (and
        logging) until the database answers; polls queue meanwhile.
        """
        if self._task is not None or self._closed:
            return
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="inventory-writer")

    async def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, waiting at most `timeout` seconds, then stop the writer.

        What is still queued after that (the database is away) is dropped, counted and logged.
        """
        if self._closed:
            return
        self._closing = True
        task = self._task
        if task is not None:
            self._wake()
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._closed = True
        self._report_drops(force=True)
        lost = len(self._queue) + self._inflight + self._overflow_polls
        self._queue.clear()
        self._take_overflow()
        self._inflight = 0
        if lost:
            self._dropped += lost
            log.warning("inventory closed with polls unwritten", extra={"fields": {
                **self.stats(), "event": "inventory_dropped", "lost": lost,
                "reason": "closed with the database away", "database": self.database,
            }})
        await self._engine.dispose()

    async def has_schema(self) -> bool:
        """Whether the database holds an inventory (of any schema version)."""
        async with self._engine.connect() as connection:
            return await connection.run_sync(lambda sync: sa.inspect(sync).has_table(schema_versions.name))

    async def migrate(self) -> int:
        """Create or migrate the schema now. Returns its version; raises when the database fails.

        Logs the database in use (password hidden) and its schema version.
        """
        version = await migrate(self._engine)
        self._ready = True
        log.info("inventory ready", extra={"fields": {
            "event": "inventory_ready", "database": self.database, "schema_version": version,
        }})
        return version

    # -- querying ------------------------------------------------------------------------------

    async def devices(
        self,
        *,
        model: str | None = None,
        since: float | None = None,
        status: int | None = None,
        stale: float | None = None,
        now: float | None = None,
    ) -> list[Device]:
        """Devices matching every filter given (durations in seconds), most recently seen first."""
        return await select_devices(self._engine, model=model, since=since, status=status, stale=stale, now=now)

    def stream_devices(self, **filters: Any) -> AsyncIterator[Device]:
        """The devices of `devices()`, one at a time from a server-side cursor: constant memory."""
        return stream_devices(self._engine, **filters)

    async def history(self, device: str, *, limit: int = 20) -> list[Poll]:
        """A device's polls (by hwid or MAC, any case or separator), newest first."""
        return await select_history(self._engine, device, limit=limit)

    async def purge(self, now: float | None = None) -> int:
        """Delete audit rows older than the retention period. Returns how many went.

        Works in chunks so a first purge of a large table never holds up the writes for long.
        """
        cutoff = (time.time() if now is None else now) - self.retention_days * 86400
        oldest = sa.select(polls.c.id).where(polls.c.time < cutoff).limit(_PURGE_CHUNK)
        deleted = 0
        while True:
            async with self._engine.begin() as connection:
                result = await connection.execute(sa.delete(polls).where(polls.c.id.in_(oldest)))
            deleted += result.rowcount
            if result.rowcount < _PURGE_CHUNK:
                return deleted

    # -- the writer ----------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wakeup is not None
        try:
            await self._retrying(self.migrate, "inventory_migrate_failed")
            next_purge = time.monotonic()
            while not (self._closing and not self._queue and not self._overflow):
                if len(self._queue) < self._batch_size and not self._closing:
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), self._flush_interval)
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self._batch_size))]
                # The overflow goes with each batch: it holds the newest polls, and a device's
                # newest poll belongs in the inventory now, not after the backlog.
                folded = fold_floods(batch, FLOOD) + self._take_overflow()
                if folded:
                    await self._write(folded)
                del batch, folded   # written: its polls are not held while the next ones come
                self._report_drops()
                if time.monotonic() >= next_purge and not self._closing:
                    next_purge = time.monotonic() + await self._purge_quietly()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("inventory writer stopped", extra={"fields": {
                "event": "inventory_writer_crashed", "database": self.database, **self.stats(),
            }})

    async def _retrying(self, action: Any, event: str) -> None:
        delay = self._retry_first
        while True:
            try:
                await action()
                return
            except Exception as exc:  # noqa: BLE001 - whatever the database says, try again later
                self._failures += 1
                self._log_failure(event, exc, delay)
                self._report_drops()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)

    async def _write(self, folded: list[Folded]) -> None:
        """Store one batch, retrying until it is in; only rows the database itself refuses are lost."""
        self._inflight = sum(1 + repeats for _, repeats, _ in folded)
        rows: list[dict[str, Any]] = []
        for record, repeats, since in folded:
            try:
                rows.append(poll_row(record, repeats, since))
            except Exception as exc:  # noqa: BLE001 - not a Outcome: nothing to store
                self._reject(exc, record)
                self._inflight -= 1 + repeats
        delay, refusals, outage_started = self._retry_first, 0, None
        while rows:
            try:
                if not self._ready:
                    await self.migrate()
                await self._store(rows)
                self._count_written(rows)
                rows = []
            except Exception as exc:  # noqa: BLE001 - the database is away, or refuses a row
                self._failures += 1
                self._ready = False  # a database recreated meanwhile gets its tables again
                outage_started = outage_started or time.monotonic()
                if await self._reachable():
                    refusals += 1
                    if refusals >= 2:
                        # Up, yet the batch failed twice: one of its rows is at fault. Find it.
                        rows = await self._store_one_by_one(rows)
                        if not rows:
                            break
                self._log_failure("inventory_write_failed", exc, delay)
                self._report_drops()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
        if outage_started is not None:
            log.info("inventory writes resumed", extra={"fields": {
                "event": "inventory_recovered", "database": self.database,
                "outage_seconds": round(time.monotonic() - outage_started, 1), **self.stats(),
            }})
        self._inflight = 0

    async def _store(self, rows: list[dict[str, Any]]) -> None:
        folded: dict[str, dict[str, Any]] = {}
        for poll in rows:
            device = device_row(poll)
            if device is not None:
                key = device["device"]
                folded[key] = merge(folded[key], device) if key in folded else device
        async with self._engine.begin() as connection:
            await self._execute(connection, _INSERT_POLLS, polls, rows)
            if folded:
                # One order for every writer, so two instances never wait on each other in a cycle.
                await self._execute(connection, upsert(connection.dialect.name), devices,
                                    [folded[key] for key in sorted(folded)])

    async def _execute(self, connection: AsyncConnection, statement: Any, table: sa.Table,
                       rows: list[dict[str, Any]]) -> None:
        """`statement` for each of `rows` (which have the same columns), in one executemany.

        Straight to the driver: no schema_translate_map and no statement events apply (the
        inventory uses neither); the connection's cursor events still see every statement."""
        key = (statement, tuple(sorted(rows[0])))
        if key not in self._compiled:
            self._compiled[key] = _Compiled.of(statement, table, key[1], connection.dialect)
        compiled = self._compiled[key]
        if compiled is None:
            await connection.execute(statement, rows)
        else:
            await connection.exec_driver_sql(compiled.sql, compiled.parameters(rows))

    async def _store_one_by_one(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store rows singly, rejecting those the database refuses; returns the unwritten rest
        when the database goes away meanwhile."""
        for index, row in enumerate(rows):
            try:
                await self._store([row])
                self._count_written([row])
            except Exception as exc:  # noqa: BLE001
                if not await self._reachable():
                    return rows[index:]
                self._reject(exc, row, polls=1 + row["repeats"])
        return []

    def _count_written(self, rows: list[dict[str, Any]]) -> None:
        repeats = sum(row["repeats"] for row in rows)
        self._written += len(rows) + repeats
        self._folded += repeats

    async def _reachable(self) -> bool:
        try:
            async with self._engine.connect() as connection:
                await connection.execute(sa.select(1))
            return True
        except Exception:  # noqa: BLE001
            return False

    async def _purge_quietly(self) -> float:
        """Purge; returns the seconds until the next purge (sooner after a failure)."""
        try:
            deleted = await self.purge()
        except Exception as exc:  # noqa: BLE001 - retention can wait; polls cannot
            self._failures += 1
            self._log_failure("inventory_purge_failed", exc, None)
            return min(self._retention_interval, 60.0)
        if deleted:
            log.info("old polls deleted", extra={"fields": {
                "event": "inventory_purged", "deleted": deleted, "retention_days": self.retention_days,
            }})
        return self._retention_interval

    # -- telling the admin ---------------------------------------------------------------------

    def _log_failure(self, event: str, exc: BaseException, retry_in: float | None) -> None:
        fields: dict[str, Any] = {
            "event": event, "database": self.database, "error": explain(exc, self._url), **self.stats(),
        }
        if retry_in is not None:
            fields["retry_in"] = retry_in
        log.warning("inventory database failed", extra={"fields": fields})

    def _reject(self, exc: BaseException, row: Any, polls: int = 1) -> None:
        self._rejected += polls
        log.error("inventory refused a poll", extra={"fields": {
            "event": "inventory_rejected", "database": self.database, "error": explain(exc, self._url),
            "hwid": row.get("hwid") if isinstance(row, dict) else getattr(row, "hwid", None),
        }})

    def _report_drops(self, force: bool = False) -> None:
        """Drops are counted in record() (no I/O there) and logged here, at most every 10 s."""
        dropped = self._dropped
        now = time.monotonic()
        due = force or now - self._drops_logged_at >= _DROP_REPORT_SECONDS
        if dropped != self._dropped_reported and due:
            log.warning("inventory queue full, polls dropped", extra={"fields": {
                **self.stats(), "event": "inventory_dropped", "lost": dropped - self._dropped_reported,
                "reason": "queue full", "queue_size": self.queue_size,
            }})
            self._dropped_reported, self._drops_logged_at = dropped, now

