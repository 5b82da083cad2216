"""Backups as the running service has them: the store, this node's schedule, the upload limit,
and one log line and one metrics count per upload.

The web layer checks an upload exactly as it checks a poll (the same admission, the same
`# device mismatch`) and hands the admitted device here with the ASGI `receive`; everything
after that happens here, without a web framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter

from ._asking import Asking
from ._store import BackupStore
from ._upload import (
    INCOMPLETE,
    TOO_LARGE,
    TOO_SLOW,
    UPLOAD_SECONDS,
    BodyIncomplete,
    BodyTooLarge,
    BodyTooSlow,
    Device,
    UploadOutcome,
    read_body,
    receive_upload,
    refused_before_reading,
)
from ._urls import upload_path

if TYPE_CHECKING:
    from ..settings import Settings

log = logging.getLogger("configserver.backups")


class Backups:
    """Everything the service runs for backups; built only when `backup_url` is set."""

    def __init__(self, store: BackupStore, asking: Asking, *, path: str, max_bytes: int,
                 registry: CollectorRegistry | None = None) -> None:
        self.store = store
        self.asking = asking
        self.path = path
        self.max_bytes = max_bytes
        self._uploads = Counter(
            "configserver_backup_uploads", "Uploads from devices, by what they carried, status and reason",
            ["what", "status", "reason"], registry=registry,
        )
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings, registry: CollectorRegistry | None = None) -> Backups | None:
        """The backups the settings ask for, or None without `backup_url`. Raises InventoryError
        for an unusable `database`."""
        if settings.backup_url is None:
            return None
        store = BackupStore(settings.database, keep=settings.backup_keep, retention_days=settings.backup_retention_days)
        asking = Asking(store, url=settings.backup_url, interval_seconds=settings.backup_interval_hours * 3600,
                        facts=settings.backup_facts)
        return cls(store, asking, path=upload_path(settings.backup_url), max_bytes=settings.backup_max_bytes,
                   registry=registry)

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start learning the fleet's uploads in the background; returns at once."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="backups-schedule")

    async def _run(self) -> None:
        while True:  # the schema first: the inventory's writer may not have made our tables yet
            try:
                await self.store.migrate()
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the database is away; try again
                log.warning("backups cannot reach the database", extra={"fields": {
                    "event": "backups_migrate_failed", "database": self.store.database, "error": type(exc).__name__,
                }})
                await asyncio.sleep(5)
        await self.asking.run()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.store.close()

    # -- one upload ---------------------------------------------------------------------------

    async def receive(
        self,
        device: Device,
        query: Mapping[str, Sequence[str]],
        receive: Callable[[], Awaitable[Mapping[str, Any]]],
        declared_length: int | None,
        now: float | None = None,
    ) -> UploadOutcome:
        """Read the admitted device's upload whole (at most `max_bytes`) and store it, or refuse."""
        now = time.time() if now is None else now
        early = refused_before_reading(declared_length, self.max_bytes)
        if early is not None:
            return early
        try:
            body = await read_body(receive, self.max_bytes)
        except BodyTooLarge:
            return UploadOutcome(413, TOO_LARGE, f"more than {self.max_bytes} bytes (setting backup_max_bytes)")
        except BodyIncomplete:
            return UploadOutcome(400, INCOMPLETE, "the device went away before the body was complete")
        except BodyTooSlow:
            return UploadOutcome(408, TOO_SLOW, f"the body was not whole within {UPLOAD_SECONDS:g} s")
        return await receive_upload(self.store, device, query, body, uploaded=self.asking.uploaded, now=now)

    def finish(self, outcome: UploadOutcome, *, path: str, client_ip: str | None, device: Device | None,
               started: float) -> None:
        """One log line and one count for an upload: what, who, how it went; never its content."""
        fields: dict[str, Any] = {
            "event": "backup_upload", "path": path, "client_ip": client_ip, "status": outcome.status,
            "reason": outcome.reason, "what": outcome.what, "size": outcome.size, "version": outcome.number,
            "detail": outcome.detail, "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        if device is not None:
            fields.update(hwid=device.hwid, mac=device.mac, model=device.model)
        level = logging.INFO if outcome.status < 500 else logging.ERROR
        log.log(level, "backup upload", extra={"fields": {k: v for k, v in fields.items() if v is not None}})
        self._uploads.labels(outcome.what or "", str(outcome.status), outcome.reason).inc()
