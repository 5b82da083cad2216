"""The web layer: one path from a request to a device's script, and the service's own routes.

Every GET or HEAD path other than the service's own is an update poll, so admins can register
whatever URL they like in my.innovaphone. A poll goes, top to bottom:

    transport facts (forwarded.py) -> checks (admission.py) -> template and vars (templates.py)
    -> render -> apply once (apply_once.py) -> answer -> one log line, one metrics count,
    one inventory record
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import logging
import os
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from .admission import Gate
from .apply_once import SENT, UNCHANGED, Applied, apply_once
from .certificates import CertificateVerifier, load_ca_bundle
from .forwarded import TrustedProxies, facts_from_headers, facts_from_tls, peer_ip
from .identity import DeviceIdentity
from .inventory import Inventory, InventoryError
from .logs import configure_logging
from .polls import PollRecord
from .refusals import Refused
from .settings import Settings, SettingsError, load_settings
from .templates import Choice, ConfigurationError, TemplateStore

log = logging.getLogger("configserver.poll")

SERVICE_PATHS = frozenset({"/healthz", "/metrics"})
RELOAD_SECONDS = 1.0
_ANSWERS_KEPT = 100_000   # devices whose answers one snapshot remembers

_PLAIN = b"text/plain; charset=utf-8"
_NO_STORE = (b"cache-control", b"no-store")


@dataclass(frozen=True, slots=True)
class Answers:
    """What a device gets from one rendering of its template: the script to send, and, when it
    is applied once, its digest and the short answer for a device that reports that digest."""

    sent: bytes
    sent_sha256: str
    digest: str | None = None
    unchanged: bytes = b""
    unchanged_sha256: str = ""

    @classmethod
    def plain(cls, script: str, key: bytes | None) -> "Answers":
        body = script.encode("utf-8")
        return cls(body, _script_hash(body, key))

    @classmethod
    def only(cls, applied: Applied, key: bytes | None) -> "Answers":
        body = applied.script.encode("utf-8")
        if applied.decision == UNCHANGED:
            return cls(b"", "", applied.digest, body, _script_hash(body, key))
        return cls(body, _script_hash(body, key), applied.digest)

    @classmethod
    def applied_once(cls, digest: str, sent: str, unchanged: str, key: bytes | None) -> "Answers":
        sent_body, unchanged_body = sent.encode("utf-8"), unchanged.encode("utf-8")
        return cls(sent_body, _script_hash(sent_body, key), digest, unchanged_body, _script_hash(unchanged_body, key))


def _script_hash(body: bytes, key: bytes | None) -> str:
    """`script_sha256` of the log and the audit: SHA-256, or HMAC-SHA256 with `digest_key`."""
    return hmac.new(key, body, hashlib.sha256).hexdigest() if key else hashlib.sha256(body).hexdigest()


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """`request` in templates: what the device asked for. `query` is the device's word only."""

    path: str
    query: dict[str, str]
    client_ip: str | None


class ConfigServer:
    """The ASGI application: polls are answered here, service routes by a small FastAPI app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        cas = load_ca_bundle(settings.ca_bundle) if settings.ca_bundle else None
        self.verifier = CertificateVerifier(cas)
        self.gate = Gate(
            settings.accepted_issuers,
            self.verifier,
            require_client_cert=settings.require_client_cert,
            cn_fixes=settings.cn_fixes,
        )
        self.trusted = TrustedProxies(
            settings.trusted_proxies, settings.proxy_secret.get_secret_value() if settings.proxy_secret else None,
        )
        self._digest_key = settings.digest_key.get_secret_value().encode() if settings.digest_key else None
        if not settings.templates.is_dir():
            # every device would get 404: a wrong path, not an empty fleet
            raise SettingsError(f"setting 'templates': {settings.templates.absolute()} is not a folder")
        self.store = TemplateStore(
            settings.templates, settings.vars, grace_seconds=settings.grace_seconds, cn_fixes=settings.cn_fixes,
            groups=settings.groups, apply_once=settings.apply_once, final_command=settings.final_command,
        )
        try:
            self.inventory = Inventory.from_settings(settings)
        except InventoryError as exc:
            raise SettingsError(str(exc)) from None
        self.recorders: list[Callable[[PollRecord], None]] = [self.inventory.record]
        self.registry = CollectorRegistry()
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
        self.api = self._service_routes()

    # -- the service's own routes and lifecycle ---------------------------------------------

    def _service_routes(self) -> FastAPI:
        api = FastAPI(lifespan=self._lifespan, docs_url=None, redoc_url=None, openapi_url=None)

        @api.get("/healthz", response_class=PlainTextResponse)
        def healthz() -> str:
            return "ok\n"

        @api.get("/metrics")
        def metrics() -> Response:
            for state, value in self.inventory.stats().items():
                self._audit.labels(state).set(value)
            return Response(generate_latest(self._exposed()), media_type=CONTENT_TYPE_LATEST)

        return api

    def _exposed(self) -> CollectorRegistry:
        """This worker's metrics, or, under `serve --workers N`, every worker's added up (the
        workers then keep their values in files in PROMETHEUS_MULTIPROC_DIR)."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return self.registry
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return registry

    @contextlib.asynccontextmanager
    async def _lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(self.store.settle)
        reloader = asyncio.create_task(self._reload_forever())
        await self.inventory.start()  # returns at once; a database that is away is retried
        try:
            yield
        finally:
            reloader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reloader
            await self.inventory.close()

    async def _reload_forever(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_SECONDS)
            try:
                await asyncio.to_thread(self.store.refresh)
            except Exception:  # a scan must never stop the reloads that follow
                log.exception("template scan failed", extra={"fields": {"event": "reload_failed"}})

    # -- ASGI entry ---------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] == "http" and scope["path"] not in SERVICE_PATHS:
            await self.poll(scope, send)
        elif scope["type"] == "http" and scope["path"] == "/metrics" and _forwarded_by_terminator(scope):
            # for whoever scrapes the app directly, not for devices through a terminator
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", _PLAIN), (b"content-length", b"12"), _NO_STORE]})
            await send({"type": "http.response.body", "body": b"# not found\n"})
        else:
            await self.api(scope, receive, send)

    async def poll(self, scope: dict[str, Any], send: Callable[..., Any]) -> None:
        """Answer one update poll: the device's own script, or a one-line `# reason` comment."""
        started = time.perf_counter()
        now = dt.datetime.now(dt.timezone.utc)
        query = urllib.parse.parse_qs(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        record = PollRecord(
            time=now.timestamp(), client_ip=peer_ip(scope), path=scope["path"], status=200, reason=None,
            query={key: values[0] for key, values in query.items()},
        )
        if scope["method"] not in ("GET", "HEAD"):
            record.status, body = 405, b"# method not allowed\n"
        else:
            try:
                body = self._answer(scope, query, now, record)
            except Exception:  # a bug must cost one answer, never the script of another device
                log.exception("poll failed", extra={"fields": {"event": "poll_failed", "path": record.path}})
                record.status, record.reason, body = 500, "internal error", b"# internal error\n"
        await send({
            "type": "http.response.start",
            "status": record.status,
            "headers": [(b"content-type", _PLAIN), (b"content-length", str(len(body)).encode()), _NO_STORE],
        })
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
        record.duration_ms = round((time.perf_counter() - started) * 1000, 3)
        self._finish(record)

    def _answer(self, scope: dict[str, Any], query: dict[str, list[str]], now: dt.datetime, record: PollRecord) -> bytes:
        """Everything between the transport and the bytes sent; fills in `record` as it goes."""
        try:
            facts = facts_from_tls(scope) if self.settings.builtin_tls else facts_from_headers(scope, self.trusted)
            record.client_ip = facts.client_ip
            device = self.gate.admit(facts, query, now)
        except Refused as refusal:  # record.client_ip: the TCP peer, unless the facts named one
            record.status, record.reason, record.detail = 403, refusal.reason, refusal.detail
            return f"# {refusal.reason}\n".encode()
        return self.script_for(device, RequestInfo(scope["path"], record.query, record.client_ip), now, record)

    def script_for(self, device: DeviceIdentity, request: RequestInfo, now: dt.datetime, record: PollRecord) -> bytes:
        """The answer for an admitted device: its script, wrapped to be applied once, or `# reason`.

        Fills in `record`. `configserver render` calls this too, so a preview is the real answer.
        """
        record.hwid, record.mac, record.model = device.hwid, device.mac, device.model
        record.check_reported = request.query.get("CHECK")
        snapshot = self.store.snapshot
        choice = snapshot.choose(device)
        record.template = choice.template
        answers = None if choice.per_poll else snapshot.answers.get(device)
        if answers is None:
            try:
                if choice.problem:
                    raise ConfigurationError(choice.problem)
                if choice.template is None:
                    record.status, record.reason = 404, "no configuration"
                    return f"# no configuration for {device.hwid}\n".encode()
                answers = self._render(choice, device, request, now, record.check_reported)
            except ConfigurationError as error:
                record.status, record.reason, record.detail = 500, "configuration error", str(error)
                return b"# configuration error\n"
            if not choice.per_poll and len(snapshot.answers) < _ANSWERS_KEPT:
                snapshot.answers[device] = answers
        record.check_digest = answers.digest
        if answers.digest is not None and record.check_reported == answers.digest:
            record.decision, record.script_sha256 = UNCHANGED, answers.unchanged_sha256
            return answers.unchanged
        record.decision = SENT if answers.digest is not None else None
        record.script_sha256 = answers.sent_sha256
        return answers.sent

    def _render(
        self, choice: Choice, device: DeviceIdentity, request: RequestInfo, now: dt.datetime, reported: str | None,
    ) -> Answers:
        """Render the device's template. An answer that will be kept holds both forms (sent and
        unchanged); one rendered for this poll only holds the form that `reported` calls for."""
        context = {
            "device": dataclasses.replace(device, groups=choice.groups) if choice.groups else device,
            "vars": choice.variables,
            "request": request,
            "now": now,
        }
        script = self.store.render(choice.template, context)  # type: ignore[arg-type]
        if not choice.apply_once:
            return Answers.plain(script, self._digest_key)
        if choice.per_poll:
            return Answers.only(apply_once(script, reported, choice.final_command, self._digest_key), self._digest_key)
        sent = apply_once(script, None, choice.final_command, self._digest_key)
        unchanged = apply_once(script, sent.digest, choice.final_command, self._digest_key)
        return Answers.applied_once(sent.digest, sent.script, unchanged.script, self._digest_key)

    def _finish(self, record: PollRecord) -> None:
        level = logging.INFO if record.status < 500 else logging.ERROR
        if log.isEnabledFor(level):
            # makeRecord + handle: the same record log.log() builds, without its stack walk
            log.handle(log.makeRecord(log.name, level, "", 0, "poll", (), None, extra={"fields": record.log_fields()}))
        key = (record.status, record.reason or "")
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self._polls.labels(str(record.status), record.reason or "")
        counter.inc()
        for recorder in self.recorders:
            recorder(record)


def _forwarded_by_terminator(scope: dict[str, Any]) -> bool:
    return any(name.startswith(b"x-ssl-client-") for name, _ in scope.get("headers", ()))


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
    return create_app(settings)
