"""The web layer: ASGI in, bytes out; one log line, one metrics count and one inventory record
per poll; the service's own routes.

Every GET or HEAD path other than the service's own is an update poll, so admins can register
whatever URL they like in my.innovaphone. What a poll gets is decided by the pipeline (poll.py);
this module only reads the transport (forwarded.py) and answers. A poll needs nothing awaited
(unless a template it needs is being changed), so the listener asks `answer_at_once` before it
goes the ASGI way (limits.AnsweredAtOnce): the same answer, log line, count and record.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from . import allocator, securitylog
from .backups import Backups, UploadOutcome
from .content import ContentStore, Snapshot
from .firmware._watch import FirmwareWatch
from .forwarded import facts_from_headers, facts_from_tls, peer_ip
from .inventory import Inventory, InventoryError
from .limits import AnsweredAtOnce
from .logs import configure_logging, log_fields
from .outcome import Outcome
from .poll import CONFIGURATION_CHANGING, INTERNAL_ERROR, Pipeline, PollRequest, query_arguments
from .refusals import Refused
from .service import Service
from .settings import Settings, SettingsError, load_settings
from .tls import is_device_listener

log = logging.getLogger("configserver.poll")

SERVICE_PATHS = frozenset({"/healthz", "/metrics"})
# How long a poll whose template changed on disk since its snapshot listed it waits for a
# snapshot that has the new version: the grace window, the watcher's look and read, and at most
# CHANGE_WAIT_MAX_SECONDS in all (terminators give up on an upstream after 60 s)
CHANGE_WAIT_SECONDS, CHANGE_WAIT_MAX_SECONDS = 2.0, 30.0

_PLAIN = b"text/plain; charset=utf-8"
_NO_STORE = (b"cache-control", b"no-store")
_METRICS = CONTENT_TYPE_LATEST.encode()


class ConfigServer:
    """The ASGI application: polls, backup uploads, and the service's own two routes.

    The service routes are two constant handlers, answered here rather than by a web framework:
    a worker then imports none (FastAPI and Starlette would weigh about 8 MB in every worker).
    """

    def __init__(self, settings: Settings, service: Service | None = None) -> None:
        self.settings = settings
        self.registry = CollectorRegistry()
        try:   # configuration backups: on when backup_url is set
            self.backups = Backups.from_settings(settings, self.registry)
        except InventoryError as exc:
            raise SettingsError(str(exc)) from None
        self.service = service or Service.from_settings(
            settings, backups=self.backups.asking if self.backups is not None else None)
        self.pipeline: Pipeline = self.service.pipeline
        self._facts = (
            facts_from_tls if settings.builtin_tls
            else lambda scope: facts_from_headers(scope, self.service.trusted)
        )
        try:
            self.inventory = Inventory.from_settings(settings)
        except InventoryError as exc:
            raise SettingsError(str(exc)) from None
        self.recorders: list[Callable[[Outcome], None]] = [self.inventory.record]
        self.answered = 0   # polls answered: allocator.give_back_while_busy looks whether any came
        self._polls = Counter(
            "configserver_polls", "Polls answered, by status and refusal reason",
            ["status", "reason"], registry=self.registry,
        )
        self._audit = Gauge(
            "configserver_audit_records", "Poll records by state: queued, written, "
            "dropped (queue full or database away at shutdown), failures (write attempts), rejected",
            ["state"], registry=self.registry, multiprocess_mode="livesum",
        )
        self._counters: dict[tuple[int, str], Any] = {}
        self.clock: Callable[[], float] = time.time   # when a poll arrived; tests set their own
        # firmware: this node's sends, the rollout halts all nodes share, the failure watch
        self.firmware = FirmwareWatch(settings.database, self.pipeline.firmware, lambda: self.store.snapshot,
                                      registry=self.registry, clock=lambda: self.clock())

    @property
    def store(self) -> ContentStore:
        return self.service.store

    # -- the service's own routes and lifecycle ---------------------------------------------

    async def _service(self, scope: dict[str, Any], send: Callable[..., Any]) -> None:
        """GET (or HEAD) /healthz and /metrics; any other method is not allowed."""
        head = scope["method"] == "HEAD"
        if scope["method"] not in ("GET", "HEAD"):
            await _send(send, 405, b"# method not allowed\n", head=False, allow=_allowed(405))
        elif scope["path"] == "/healthz":
            await _send(send, 200, b"ok\n", head=head)
        else:
            for state, value in self.inventory.stats().items():
                self._audit.labels(state).set(value)
            await _send(send, 200, generate_latest(self._exposed()), head=head, content_type=_METRICS)

    def _exposed(self) -> CollectorRegistry:
        """This worker's metrics, or, under `serve --workers N`, every worker's added up (the
        workers then keep their values in files in PROMETHEUS_MULTIPROC_DIR)."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return self.registry
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return registry

    async def _lifespan_protocol(self, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        """ASGI's lifespan messages: start the background work on startup, stop it on shutdown.
        A start-up that fails is reported to the server (which then stops) with its cause."""
        await receive()   # lifespan.startup
        started = False
        try:
            async with self._lifespan():
                await send({"type": "lifespan.startup.complete"})
                started = True
                await receive()   # lifespan.shutdown
        except Exception as exc:
            stage = "shutdown" if started else "startup"
            log.exception(f"{stage} failed", extra={"fields": {"event": f"{stage}_failed"}})
            await send({"type": f"lifespan.{stage}.failed", "message": f"{type(exc).__name__}: {exc}"})
        else:
            await send({"type": "lifespan.shutdown.complete"})

    @contextlib.asynccontextmanager
    async def _lifespan(self) -> AsyncIterator[None]:
        allocator.limit_arenas()   # before the audit writer's, the database driver's and asyncio's threads
        await asyncio.to_thread(self.store.settle)
        reloader = asyncio.create_task(self._reload_forever())
        giver = asyncio.create_task(allocator.give_back_while_busy(lambda: self.answered))
        try:   # what started is stopped again, also when a later start fails
            await self.inventory.start()  # returns at once; a database that is away is retried
            if self.backups is not None:
                await self.backups.start()  # returns at once, as the inventory does
            await self.firmware.start()  # returns once the halts are read, or within 2 s
            yield
        except BaseException:
            await self._stop(reloader, giver, raising=False)   # the start's or the run's failure is the one told
            raise
        await self._stop(reloader, giver, raising=True)

    async def _stop(self, *tasks: asyncio.Task[Any], raising: bool) -> None:
        """Stop what `_lifespan` started, every part of it even when one fails or the stop is
        cancelled: the firmware watch, the backups, the background tasks, and last the
        inventory, whose queued polls are written then. A part that fails is logged; the first
        one is raised when `raising`, and a cancellation once everything is stopped."""
        failures: list[BaseException] = []

        async def stopping(part: str, close: Callable[[], Any]) -> None:
            try:
                await close()
            except BaseException as exc:   # CancelledError too: the rest is stopped all the same
                failures.append(exc)
                if not raising or len(failures) > 1 or not isinstance(exc, Exception):
                    log.error("stopping failed", exc_info=exc, extra={"fields": {"event": "stop_failed", "part": part}})

        await stopping("firmware", self.firmware.close)
        if self.backups is not None:
            await stopping("backups", self.backups.close)

        async def cancel_tasks() -> None:
            for task in tasks:
                task.cancel()
            # a task that failed is said so; none may keep the audit below from being written
            for task, ended in zip(tasks, await asyncio.gather(*tasks, return_exceptions=True)):
                if isinstance(ended, Exception):
                    log.error("background task failed", exc_info=ended, extra={"fields": {
                        "event": "task_failed", "task": task.get_coro().__qualname__}})

        await stopping("background tasks", cancel_tasks)
        await stopping("inventory", self.inventory.close)
        cancelled = [failure for failure in failures if not isinstance(failure, Exception)]
        if cancelled:
            raise cancelled[0]
        if failures and raising:
            raise failures[0]

    async def _reload_forever(self) -> None:
        # file events refresh what changed; the slow rescan catches what events miss (content/watcher.py)
        await self.store.follow(self.settings.rescan_seconds)

    # -- ASGI entry ---------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if self._is_upload(scope):
            await self.upload(scope, receive, send)
        elif self._is_poll(scope):
            await self.poll(scope, send)
        elif scope["type"] == "http" and scope["path"] == "/metrics" and self._from_a_device(scope):
            # for whoever scrapes the app directly, not for devices
            await _send(send, 404, b"# not found\n", head=False)
        elif scope["type"] == "http":
            await self._service(scope, send)
        elif scope["type"] == "lifespan":
            await self._lifespan_protocol(receive, send)
        else:   # the listeners speak no WebSocket (tls.py: ws "none"); ASGI says: raise
            raise RuntimeError(f"unsupported ASGI scope type {scope['type']!r}")

    def _is_upload(self, scope: dict[str, Any]) -> bool:
        return (scope["type"] == "http" and scope["method"] == "PUT" and self.backups is not None
                and scope["path"] == self.backups.path)

    def _is_poll(self, scope: dict[str, Any]) -> bool:
        return scope["type"] == "http" and scope["path"] not in SERVICE_PATHS and not self._is_upload(scope)

    def answer_at_once(self, scope: dict[str, Any]) -> AnsweredAtOnce | None:
        """A poll's answer, for the listener's protocol to write itself (limits.AnsweredAtOnce):
        the same answer, log line, count and record as `poll`, without the task and ASGI
        messages of uvicorn's (tens of µs of a poll between handshakes). None for every other
        request, and for a poll that waits for a template being changed: `poll` answers those,
        asking the pipeline again (nothing was logged, counted or recorded of the first answer)."""
        if not self._is_poll(scope):
            return None
        outcome, waiting = self._answer(scope)
        if waiting is not None:
            return None
        return AnsweredAtOnce(outcome.status, _headers(outcome.body, allow=_allowed(outcome.status)), outcome.body,
                              partial(self._finish, outcome))

    async def poll(self, scope: dict[str, Any], send: Callable[..., Any]) -> None:
        """Answer one update poll with what the pipeline decides; log, count and record it."""
        outcome, waiting = self._answer(scope)
        if waiting is not None:
            try:
                outcome = await self._answer_again(waiting, outcome)
            except Exception:  # a bug must cost one answer, never the script of another device
                outcome = self._failed(scope, waiting.request.time, waiting.request.started)
        await _send(send, outcome.status, outcome.body, head=scope["method"] == "HEAD", allow=_allowed(outcome.status))
        self._finish(outcome)

    def _answer(self, scope: dict[str, Any]) -> tuple[Outcome, _Waiting | None]:
        """The pipeline's answer to a poll, and, when it needs a template changed on disk since
        the snapshot it was listed in (CONFIGURATION_CHANGING), what `_answer_again` needs."""
        started = time.perf_counter()
        arrived = self.clock()
        client_ip = peer_ip(scope)
        query = _query(scope)
        try:
            try:
                facts = self._facts(scope)
            except Refused as refusal:   # the transport itself is not to be believed
                request = PollRequest(scope["method"], scope["path"], query, None, refusal.client_ip or client_ip,
                                      arrived, started)
                return self.pipeline.refuse(request, refusal), None
            request = PollRequest(scope["method"], scope["path"], query, facts,
                                  facts.client_ip or client_ip, arrived, started)
            now = dt.datetime.fromtimestamp(arrived, dt.UTC)
            listed = self.store.snapshot
            outcome = self.pipeline.answer(request, now)
        except Exception:  # a bug must cost one answer, never the script of another device
            return self._failed(scope, arrived, started), None
        if outcome.reason == CONFIGURATION_CHANGING:
            return outcome, _Waiting(request, now, listed)
        return outcome, None

    def _failed(self, scope: dict[str, Any], arrived: float, started: float) -> Outcome:
        """The answer to a poll the code failed on, logged with the exception being handled."""
        log.exception("poll failed", extra={"fields": {"event": "poll_failed", "path": scope["path"]}})
        return Outcome(arrived, peer_ip(scope), scope["path"], 500, INTERNAL_ERROR, body=b"# internal error\n",
                       duration_ms=round((time.perf_counter() - started) * 1000, 3))

    async def _answer_again(self, waiting: _Waiting, outcome: Outcome) -> Outcome:
        """The answer to a poll that needs a template changed on disk since it was listed: the
        pipeline's answer from each snapshot published next, until it is no longer that or the
        wait ends."""
        request, now, listed = waiting
        deadline = time.monotonic() + min(self.settings.grace_seconds + CHANGE_WAIT_SECONDS, CHANGE_WAIT_MAX_SECONDS)
        while outcome.reason == CONFIGURATION_CHANGING:
            # `listed` may be older than the snapshot the pipeline used: then this answers again at once
            if not await self.store.newer_than(listed, deadline - time.monotonic()):
                break
            listed = self.store.snapshot
            outcome = self.pipeline.answer(request, now)
        return outcome

    async def upload(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        """A device's PUT of its configuration or facts (configserver/backups/): the same clock and
        admission as a poll, so the certificate's device and nobody else; then backups/ reads,
        checks and stores the body. A refusal is logged for fail2ban and kept in the device's
        history, as a refused poll is."""
        assert self.backups is not None
        started, arrived = time.perf_counter(), self.clock()
        client_ip = peer_ip(scope)
        query = _query(scope)
        device = facts = None
        try:
            facts = self._facts(scope)
            client_ip = facts.client_ip or client_ip
            device = self.pipeline.admission.admit(facts, query, dt.datetime.fromtimestamp(arrived, dt.UTC))
        except Refused as refusal:
            device = refusal.device
            client_ip = refusal.client_ip or client_ip
            outcome = UploadOutcome(403, refusal.reason, refusal.detail)
            self._refused_upload(PollRequest(scope["method"], scope["path"], query, facts, client_ip, arrived,
                                             started), refusal)
        else:
            try:
                outcome = await self.backups.receive(device, query, receive, _content_length(scope), arrived)
            except Exception:  # a bug must cost this upload only; the type alone, never the body
                log.exception("upload failed", extra={"fields": {"event": "upload_failed", "path": scope["path"]}})
                outcome = UploadOutcome(500, INTERNAL_ERROR)
        await _send(send, outcome.status, outcome.body, head=False)
        self.backups.finish(outcome, path=scope["path"], client_ip=client_ip, device=device, started=started)

    def _refused_upload(self, request: PollRequest, refusal: Refused) -> None:
        """A refused upload's security log line and its record in the device's history (the
        upload's own log line and count are the backups' `finish`)."""
        self._keep(self.pipeline.refuse(request, refusal))

    def _from_a_device(self, scope: dict[str, Any]) -> bool:
        """Whether a request came the devices' way: through a terminator, or over the built-in
        TLS listener (every client there has a device certificate, or is trying to)."""
        if is_device_listener(scope):
            return True
        return any(name.startswith(b"x-ssl-client-") for name, _ in scope.get("headers", ()))

    def _finish(self, outcome: Outcome) -> None:
        level = logging.INFO if outcome.status < 500 else (
            logging.WARNING if outcome.reason == CONFIGURATION_CHANGING else logging.ERROR)
        if log.isEnabledFor(level):
            log_fields(log, level, outcome.log_fields())
        self.answered += 1
        key = (outcome.status, outcome.reason or "")
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self._polls.labels(str(outcome.status), outcome.reason or "")
        counter.inc()
        self._keep(outcome)

    def _keep(self, outcome: Outcome) -> None:
        """What stays of an outcome: a refusal's security log line, and the inventory record."""
        if outcome.status == 403:   # for fail2ban: the real client address, the reason, the device named
            securitylog.refusal(outcome.client_ip, outcome.reason or "", outcome.hwid, outcome.path)
        for recorder in self.recorders:
            recorder(outcome)


class _Waiting(NamedTuple):
    """A poll waiting for a template being changed: what it asked, when, and the snapshot listed then."""

    request: PollRequest
    now: dt.datetime
    listed: Snapshot


def _allowed(status: int) -> bytes | None:
    """The `Allow` header a 405 must carry (RFC 9110 15.5.6): polls and the service routes
    take GET and HEAD (a backup upload's PUT has a path of its own)."""
    return b"GET, HEAD" if status == 405 else None


def _headers(body: bytes, content_type: bytes = _PLAIN, allow: bytes | None = None) -> list[tuple[bytes, bytes]]:
    """The headers of every answer of ours."""
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), _NO_STORE]
    if allow is not None:
        headers.append((b"allow", allow))
    return headers


async def _send(send: Callable[..., Any], status: int, body: bytes, *, head: bool,
                content_type: bytes = _PLAIN, allow: bytes | None = None) -> None:
    headers = _headers(body, content_type, allow)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


def _query(scope: dict[str, Any]) -> dict[str, list[str]]:
    """The request's query arguments, every value of each (poll.query_arguments)."""
    raw = scope["query_string"]
    return query_arguments(raw.decode("latin-1")) if raw else {}


def _content_length(scope: dict[str, Any]) -> int | None:
    """The declared body length of an upload, None when chunked or unreadable."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def create_app(settings: Settings) -> ConfigServer:
    """Build the service for `settings`. Nothing happens at import time; build as many as you like."""
    return ConfigServer(settings)


def create_app_from_environment() -> ConfigServer:
    """The uvicorn factory: settings from `CONFIGSERVER_CONFIG_FILE` (if set) and the environment.

    `configserver serve` hands its settings to every worker process this way.
    """
    config_file = os.environ.get("CONFIGSERVER_CONFIG_FILE")
    settings = load_settings(config_file=Path(config_file) if config_file else None)
    configure_logging(settings.log_level)
    configure_security_log(settings)
    return create_app(settings)


def configure_security_log(settings: Settings) -> None:
    """Send this process's refusal lines where `security_log` says. Raises SettingsError."""
    try:
        securitylog.configure(settings.security_log)
    except OSError as exc:
        raise SettingsError(str(exc)) from None
