"""The rollout as a serving node runs it: sends written, halts read, failures watched, metrics.

Every `interval` seconds, off the poll path: read the halted targets (so a halt any node takes
holds here within one interval), write the sends this node's polls queued, count the failures
and halt what passed its threshold. The poll path itself only reads memory, and sends no file
while the halts are not known: not read yet, or last read more than HALTS_KEPT (six intervals)
ago (firmware/_state.py). `configserver_firmware_halts_known` shows which, and the log says when
it changes.

Imported by the web layer only: it carries the metrics (prometheus_client).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..inventory import database_url, migrate, open_engine
from ._stage import FirmwareStage, Send
from ._state import HALTS_KEPT, RolloutState

if TYPE_CHECKING:
    from ..settings import Settings

log = logging.getLogger("configserver.firmware")

INTERVAL = 5.0       # seconds between passes: sends written, halts read
WATCH_EVERY = 6      # passes between two counts of the failures (30 s)
FIRST_READ_WAIT = 2.0   # seconds a start waits for the halts before serving polls without files


class _CountingState(RolloutState):
    """RolloutState that also counts each send in the metrics."""

    def __init__(self, engine: Any, sent: Counter) -> None:
        super().__init__(engine)
        self._sent = sent

    def note(self, send: Send) -> None:
        super().note(send)
        self._sent.labels(send.model.casefold(), send.kind).inc()


class FirmwareWatch:
    """The rollout's background work on one node, and its metrics."""

    def __init__(
        self, database: str, stage: FirmwareStage, snapshot: Callable[[], Any], *,
        registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.time,
        interval: float = INTERVAL,
    ) -> None:
        """`stage`: the pipeline's firmware stage, given this node's state here; `snapshot`:
        the content snapshot in use (the models' rollouts come from it). Connects nothing yet."""
        self._engine = open_engine(database_url(database))
        self._sent = Counter("configserver_firmware_sent", "Firmware and boot code lines sent, by model and kind",
                             ["model", "kind"], registry=registry)
        self._halted = Gauge("configserver_firmware_halted", "1 for each target whose rollout is halted",
                             ["model", "kind", "build"], registry=registry, multiprocess_mode="livemax")
        self._known = Gauge("configserver_firmware_halts_known",
                            "1 while this node knows the halts (read within the last "
                            f"{HALTS_KEPT:g} s), 0 while it sends no firmware or boot code line",
                            registry=registry, multiprocess_mode="livemin")
        self.state = _CountingState(self._engine, self._sent)
        self.stage = stage
        stage.state = self.state
        self._snapshot = snapshot
        self._clock = clock
        self._interval = interval
        self._shown: set[tuple[str, str, str]] = set()
        self._migrated = False
        self._passes = 0
        self._failing = False
        self._told_unknown = False   # the log said the halts are not known, and not since that they are
        self._known.set(0)
        self._read = asyncio.Event()   # set once the halts were read
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings, stage: FirmwareStage, snapshot: Callable[[], Any],
                      registry: CollectorRegistry | None = None) -> FirmwareWatch:
        return cls(settings.database, stage, snapshot, registry=registry)

    async def tick(self, watch: bool = True) -> None:
        """One pass: read the halts, write the queued sends, and (with `watch`) halt what
        failed. Each step is tried whatever the one before did, so that sends that cannot be
        written never keep a halt unread. Raises the first of the database's errors (the loop
        logs it and tries again); then nothing is halted on this pass."""
        failed: list[Exception] = []
        if not self._migrated:   # the inventory's writer may not have made our tables yet
            try:
                await migrate(self._engine)
                self._migrated = True
            except Exception as exc:  # noqa: BLE001 - another node's tables may be there to read
                failed.append(exc)
        try:
            await self.state.refresh()
            self._read.set()
        except Exception as exc:  # noqa: BLE001 - raised below, once the sends were tried too
            failed.append(exc)
        self._show(self.state.halts)
        self._show_known()
        try:
            await self.state.flush()
        except Exception as exc:  # noqa: BLE001 - raised below
            failed.append(exc)
        if failed:
            raise failed[0]
        if watch:
            await self.state.watch(self._clock(), self.stage.policy(self._snapshot()))
            self._show(self.state.halts)

    def _show(self, halts: frozenset[tuple[str, str, str]]) -> None:
        for target in self._shown - halts:
            self._halted.labels(*target).set(0)
        for target in halts:
            self._halted.labels(*target).set(1)
        self._shown = set(halts)

    def _show_known(self) -> None:
        """The gauge, and a log line when the halts go stale or are known again: once each."""
        known = self.state.knows_halts()
        self._known.set(1 if known else 0)
        if known and self._told_unknown:
            self._told_unknown = False
            log.info("firmware halts known", extra={"fields": {"event": "firmware_halts_known"}})
        elif not known and not self._told_unknown and self.state.halts_age() != float("inf"):
            self._told_unknown = True
            log.warning("firmware halts stale: no firmware or boot code line is sent", extra={"fields": {
                "event": "firmware_halts_stale", "read_seconds_ago": round(self.state.halts_age(), 1),
                "kept_seconds": HALTS_KEPT}})

    async def start(self) -> None:
        """Start the background passes; returns once the halts are read, or after
        FIRST_READ_WAIT seconds when the database does not answer (logged: until it does, polls
        get no firmware or boot code line)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="firmware-watch")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._read.wait(), FIRST_READ_WAIT)
            if not self.state.knows_halts() and not self._told_unknown:
                self._told_unknown = True
                log.warning("firmware halts not read at start: no firmware or boot code line is sent",
                            extra={"fields": {"event": "firmware_halts_unknown_at_start",
                                              "waited_seconds": FIRST_READ_WAIT}})

    async def _run(self) -> None:
        while True:
            try:
                await self.tick(watch=self._passes % WATCH_EVERY == 0)
                self._passes += 1
                if self._failing:
                    self._failing = False
                    log.info("firmware watch back", extra={"fields": {"event": "firmware_watch_back"}})
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the database is away: polls go on, the next pass retries
                if not self._failing:   # once until it works again, not every few seconds
                    self._failing = True
                    log.warning("firmware watch failed", extra={"fields": {
                        "event": "firmware_watch_failed", "error": f"{type(exc).__name__}: {exc}"[:300]}})
            await asyncio.sleep(self._interval)

    async def close(self) -> None:
        """Stop the passes, write what is queued (if the database answers), let go of it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.state.flush()
        await self._engine.dispose()
