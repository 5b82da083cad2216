"""What one node knows of the fleet's uploads and the admins' requests, and the lines a poll's
answer gets from it.

A poll must not wait for the database, so each node keeps the newest upload time of every
device in memory: its own uploads at once, the other nodes' by a query every few seconds for
the rows changed since the last one. Until the first query has answered, no device is asked:
after a restart that would ask the whole fleet at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ._schedule import Knowledge, device_targets, is_due, newest_request
from ._store import BackupStore
from ._urls import upload_lines

log = logging.getLogger("configserver.backups")

REFRESH_SECONDS = 10.0
PURGE_SECONDS = 3600.0
# Rows written on another node just before our last query may carry a slightly older time.
_OVERLAP_SECONDS = 120.0


class Asking:
    """Decides, per poll, whether the answer asks the device for its configuration."""

    def __init__(
        self,
        store: BackupStore,
        *,
        url: str | None,
        interval_seconds: float,
        facts: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.url = url
        self.interval = interval_seconds
        self.facts = facts
        self._clock = clock
        self.since = clock()
        self.ready = False
        self._uploads: dict[str, float] = {}
        self._asked: dict[str, float] = {}
        self._requests: dict[str, float] = {}
        self._cursor: float | None = None
        self._lines = upload_lines(url, facts) if url else []

    def lines(self, mac: str, hwid: str, model: str, now: float | None = None) -> list[str]:
        """The script lines for this poll: the upload requests when the device is due, else none."""
        if not self._lines or not self.ready:
            return []
        now = self._clock() if now is None else now
        known = Knowledge(
            last_upload=self._uploads.get(mac),
            asked=self._asked.get(mac),
            requested=newest_request(self._requests, device_targets(mac, hwid, model)) if self._requests else None,
        )
        if not is_due(hwid, now, self.interval, known, self.since):
            return []
        self._asked[mac] = now
        return list(self._lines)

    def uploaded(self, mac: str, at: float) -> None:
        """This node took a configuration upload from `mac` at `at`."""
        if at > self._uploads.get(mac, float("-inf")):
            self._uploads[mac] = at

    async def refresh(self) -> None:
        """Learn the uploads and requests of every node since the last refresh. Raises when the
        database fails (the loop retries)."""
        now = self._clock()
        since = float("-inf") if self._cursor is None else self._cursor - _OVERLAP_SECONDS
        changed = await self.store.uploads_since(since)
        self._requests = await self.store.requests(now)
        for mac, at in changed.items():
            self.uploaded(mac, at)
        self._cursor = now
        self.ready = True

    async def run(self, refresh_seconds: float = REFRESH_SECONDS, purge_seconds: float = PURGE_SECONDS) -> None:
        """Refresh forever, and purge old versions now and then; failures are logged and retried."""
        next_purge = 0.0
        while True:
            try:
                await self.refresh()
                if time.monotonic() >= next_purge:
                    deleted = await self.store.purge(self._clock())
                    next_purge = time.monotonic() + purge_seconds
                    if deleted:
                        log.info("old backups deleted", extra={"fields": {
                            "event": "backups_purged", "deleted": deleted,
                            "retention_days": self.store.retention_days,
                        }})
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the database is away; polls go on without asking
                log.warning("backup schedule cannot reach the database", extra={"fields": {
                    "event": "backups_refresh_failed", "database": self.store.database,
                    "error": type(exc).__name__,
                }})
            await asyncio.sleep(refresh_seconds)
