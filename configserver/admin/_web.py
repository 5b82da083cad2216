"""The admin page's web layer: login, the fleet, one device; HTML rendered on the server.

Every page but the login form and the style sheet needs a session; every POST carries the
session's CSRF token (the login form its own); every answer carries headers that forbid inline
script, framing and caching. The app answers its own paths only: no path of it is a poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import logging
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from importlib import resources
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.exc import SQLAlchemyError

from .. import securitylog
from ..firmware import RolloutState
from ..forwarded import TrustedProxies
from ..inventory import InventoryError, check_status, parse_duration
from ..inventory._database import database_url, migrate, open_engine
from ..settings import Settings
from . import _device, _fleet, _script
from ._sessions import Sessions, Throttle
from ._users import Users, UsersError

log = logging.getLogger("configserver.admin")

SESSION_COOKIE = "configserver_admin"
LOGIN_COOKIE = "configserver_admin_login"
CHECK_SECONDS = 60.0   # how long the result of `check` is shown before it runs again

# No inline script or style can run: everything comes from our own /static/admin.css, and
# there is no script at all. Forms post to ourselves only; nobody may frame the page.
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cache-control": "no-store",
}


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("configserver.admin", "templates"),
        autoescape=True,              # every value is text, never markup
        undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["ago"] = _ago
    env.filters["utc"] = _utc
    env.filters["duration"] = _duration
    return env


def _utc(stamp: float | None) -> str:
    if stamp is None:
        return "never"
    return dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _ago(stamp: float | None, now: float) -> str:
    if stamp is None:
        return "never"
    return "just now" if now - stamp < 5 else f"{_duration(now - stamp)} ago"


class AdminPage:
    """Everything one admin listener keeps: settings, users, sessions, the inventory engine."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.users = Users(settings.admin_users)
        try:
            len(self.users)   # a broken users file stops start-up, with the line at fault
        except UsersError as exc:
            from ..settings import SettingsError
            raise SettingsError(str(exc)) from None
        if not settings.admin_users.exists():
            # Not an error (the page says "no users yet"), but usually the wrong file: a relative
            # `admin_users` is looked for in the working directory, / under systemd.
            log.warning("admin users file missing", extra={"fields": {
                "event": "admin_users_missing", "admin_users": str(settings.admin_users.absolute()),
                "fix": "set admin_users to an absolute path and add a user there with "
                       "`configserver --config FILE admin-user add NAME`"}})
        self.sessions = Sessions(settings.admin_session_minutes * 60.0, self.users.hash_of)
        self.throttle = Throttle()
        self.trusted = TrustedProxies(settings.trusted_proxies)
        secret = settings.proxy_secret.get_secret_value() if settings.proxy_secret else None
        self._proxy_secret = secret.encode("utf-8") if secret else None
        self.templates = _templates()
        self.css = resources.files("configserver.admin").joinpath("static/admin.css").read_bytes()
        try:
            self.engine = open_engine(database_url(settings.database))
        except InventoryError as exc:
            from ..settings import SettingsError
            raise SettingsError(str(exc)) from None
        self._checked: tuple[float, list[Any]] | None = None
        self._service: Any = None
        self._service_lock = threading.Lock()   # one build of the service
        self._render_lock = threading.Lock()    # one preview at a time
        self._following = False

    # -- the content, as the devices' app keeps it ---------------------------------------------

    def content_service(self) -> Any:
        """The poll pipeline over one content store that this process keeps (built and scanned
        on first use, then kept current by `follow_content`). Raises ConfigserverError."""
        with self._service_lock:
            if self._service is None:
                from ..service import Service
                service = Service.from_settings(self.settings, grace_seconds=0)
                service.store.settle()
                self._service = service
            return self._service

    async def follow_content(self) -> None:
        """Keep the content store current the way the devices' app does (file events, and a
        rescan every `rescan_seconds`), so a device page never rescans both folders."""
        from ..errors import ConfigserverError

        try:
            service = await asyncio.to_thread(self.content_service)
        except ConfigserverError as exc:   # said on each device page, which tries again
            log.error("content unusable", extra={"fields": {"event": "admin_content_failed", "error": str(exc)}})
            return
        self._following = True
        try:
            await service.store.follow(self.settings.rescan_seconds)
        finally:
            self._following = False

    # -- transport facts ----------------------------------------------------------------------

    def from_terminator(self, request: Request) -> bool:
        """Whether the forwarded headers may be believed: the admin vhost proves itself with
        `proxy_secret` (X-Configserver-Proxy-Secret, as the devices' vhost does), from a peer in
        `trusted_proxies` or over the unix socket. Loopback alone proves nothing: any local
        process could otherwise name any address (to get it banned, or to dodge the throttle)."""
        if self._proxy_secret is None:
            return False
        peer = request.client.host if request.client else None
        if peer is not None and peer not in self.trusted:
            return False
        given = request.headers.getlist("x-configserver-proxy-secret")
        return len(given) == 1 and hmac.compare_digest(given[0].strip().encode("latin-1"), self._proxy_secret)

    def client_ip(self, request: Request) -> str | None:
        """The admin's address: the TCP peer, or, from the terminator (`from_terminator`), the
        right-most X-Forwarded-For entry it appended."""
        peer = request.client.host if request.client else None
        if not self.from_terminator(request):
            return peer
        forwarded = [part.strip() for part in request.headers.getlist("x-forwarded-for") for part in part.split(",")]
        return (forwarded[-1] if forwarded and forwarded[-1] else None) or request.headers.get("x-real-ip") or peer

    def over_tls(self, request: Request) -> bool:
        """Whether the browser talks TLS to us or to the terminator in front (then the cookie is Secure)."""
        if request.url.scheme == "https":
            return True
        return self.from_terminator(request) and request.headers.get("x-forwarded-proto", "").lower() == "https"

    # -- rendering ----------------------------------------------------------------------------

    def html(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        body = self.templates.get_template(template).render(now=time.time(), **context)
        return HTMLResponse(body, status_code=status)

    def problems_of_check(self) -> list[Any]:
        """`configserver check`'s problems, at most CHECK_SECONDS old."""
        now = time.monotonic()
        if self._checked is None or now - self._checked[0] > CHECK_SECONDS:
            from ..lint import check
            try:
                found: list[Any] = check(self.settings)
            except Exception as exc:
                log.exception("check failed", extra={"fields": {"event": "admin_check_failed"}})
                found = [f"configserver check could not run: {type(exc).__name__}: {exc}"]
            self._checked = (now, found)
        return self._checked[1]


    def would_get(self, name: str, path: str, reported: str | None, reveal: bool,
                  builds: Mapping[str, str | None] | None = None) -> dict[str, Any]:
        """What the device `name` would get now polling `path` (`configserver render`'s answer),
        masked unless `reveal`; or, as `error`, why it cannot be shown. `builds` ("PROT", "BOOT")
        are what it last reported: its firmware state is decided with them, as a poll would."""
        from ..errors import ConfigserverError
        from ..preview import preview

        try:
            service = self.content_service()
            if not self._following:   # served without its lifespan: look at the folders now
                service.store.refresh()
            with self._render_lock:
                answer = preview(service, name, path or "/")
                firmware = self._firmware_now(answer, {**(builds or {}), "CHECK": reported})
        except ConfigserverError as exc:
            return {"error": str(exc)}
        record, choice = answer.record, answer.choice
        variables = choice.variables   # merged when asked: once for both uses
        masked = _script.mask(answer.body.decode("utf-8", "replace").replace("\r\n", "\n"),
                              variables, self.settings.admin_secret_vars, reveal=reveal)
        return {
            "error": None, "status": record.status, "reason": record.reason, "detail": record.detail,
            "template": choice.template, "vars_files": choice.vars_files, "groups": choice.groups,
            "note": answer.note, "digest": record.check_digest, "applied": (
                None if record.check_digest is None else reported == record.check_digest),
            "script": masked.script, "variables": masked.variables, "secrets": masked.secrets, "reveal": reveal,
            "firmware": firmware, "secret_values": [] if reveal else _script.secret_values(
                variables, self.settings.admin_secret_vars),
        }

    def _firmware_now(self, answer: Any, reported: Mapping[str, str | None]) -> dict[str, Any]:
        """The device's firmware targets and what a poll reporting `reported` would be sent now,
        from the pipeline's own firmware stage (no halts: the page reads those from the database)."""
        from ..firmware import FirmwareError, place, takes

        stage, snapshot = self._service.pipeline.firmware, self._service.store.snapshot
        device, choice = answer.device, answer.choice
        if not device.model:
            return {"error": None, "targets": {}, "verdicts": {}, "lines": (), "wave": None, "opens": None,
                    "rollout": False}
        try:
            declaration = stage.declaration(snapshot, choice)
            query = {key: value for key, value in reported.items() if value}
            decided = stage.answer(snapshot, choice, device, query, dt.datetime.now(dt.UTC))
        except FirmwareError as exc:
            return {"error": str(exc)}
        placement = place(declaration.rollout, device.hwid, device.mac, choice.groups)
        return {
            "error": None, "verdicts": dict(decided.verdicts), "lines": decided.lines,
            "targets": {kind: build for kind, build in declaration.targets.items() if takes(device.model, kind)},
            "wave": placement.wave, "opens": placement.opens.timestamp() if placement.opens else None,
            "rollout": declaration.rollout is not None,
        }


def create_admin_app(settings: Settings) -> FastAPI:
    """The admin page for `settings`, as an ASGI app. Builds, connects nothing yet; raises
    SettingsError for a users file or database setting it cannot use."""
    page = AdminPage(settings)
    try:
        securitylog.configure(settings.security_log)
    except OSError as exc:
        from ..settings import SettingsError
        raise SettingsError(str(exc)) from None

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            await migrate(page.engine)   # the same schema `serve` makes: the page may start first
        except (SQLAlchemyError, OSError, InventoryError) as exc:
            log.error("inventory unusable", extra={"fields": {"event": "admin_inventory_failed", "error": str(exc)}})
        following = asyncio.create_task(page.follow_content(), name="admin-content")
        try:
            yield
        finally:
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await following
            await page.engine.dispose()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.page = page

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers[name] = value
        if page.over_tls(request):
            response.headers["strict-transport-security"] = "max-age=31536000"
        return response

    def set_cookie(response: Response, request: Request, name: str, value: str, max_age: int | None) -> None:
        response.set_cookie(name, value, max_age=max_age, httponly=True, samesite="strict",
                            secure=page.over_tls(request), path="/")

    def to_login() -> RedirectResponse:
        return RedirectResponse("/login", status_code=303)

    @app.get("/static/admin.css")
    def css() -> Response:
        return Response(page.css, media_type="text/css; charset=utf-8")

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=404)

    @app.get("/login")
    def login_form(request: Request) -> Response:
        if page.sessions.find(request.cookies.get(SESSION_COOKIE)):
            return RedirectResponse("/", status_code=303)
        # The token already held stays: a second tab, or the browser's own requests that end
        # here (favicon), must not make the form in the first one stale.
        held = request.cookies.get(LOGIN_COOKIE)
        token = held if page.sessions.login_token_valid(held, held) else page.sessions.login_token()
        response = page.html("login.html", token=token, error=None, user="", no_users=len(page.users) == 0)
        set_cookie(response, request, LOGIN_COOKIE, token, 3600)
        return response

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        user, password = str(form.get("user", "")), str(form.get("password", ""))
        client = page.client_ip(request)
        wait = page.throttle.begin(client or "-")
        if wait:
            # one attempt at a time per address, none before its wait is over: refused without
            # computing a hash, so parallel guesses gain nothing
            log.warning("admin login refused: too many", extra={"fields": {
                "event": "admin_login_throttled", "user": user[:64], "client_ip": client}})
            token = page.sessions.login_token()
            response = page.html("login.html", 429, token=token, user=user, no_users=len(page.users) == 0,
                                 error=f"Too many login attempts from your address; try again in {wait:g} s.")
            set_cookie(response, request, LOGIN_COOKIE, token, 3600)
            response.headers["retry-after"] = str(int(wait))
            return response
        try:
            return await _attempt(request, form, user, password, client)
        finally:
            page.throttle.done(client or "-")

    async def _attempt(request: Request, form: Any, user: str, password: str, client: str | None) -> Response:
        if not page.sessions.login_token_valid(request.cookies.get(LOGIN_COOKIE), str(form.get("csrf", ""))):
            # a form we did not hand out (or one older than an hour): no password is checked
            token = page.sessions.login_token()
            response = page.html("login.html", 400, token=token, error="The form expired; try again.",
                                 user=user, no_users=len(page.users) == 0)
            set_cookie(response, request, LOGIN_COOKIE, token, 3600)
            return response
        hashed = await asyncio.to_thread(page.users.check, user, password)
        if hashed is not None:
            # bound to this hash: a new password or the user's removal ends the session
            cookie, _ = page.sessions.start(user, hashed)
            log.info("admin login", extra={"fields": {"event": "admin_login", "user": user, "client_ip": client}})
            response = RedirectResponse("/", status_code=303)
            set_cookie(response, request, SESSION_COOKIE, cookie, int(page.sessions.lifetime))
            response.delete_cookie(LOGIN_COOKIE, path="/")
            return response
        securitylog.login_failed(client, user)
        log.warning("admin login failed", extra={"fields": {
            "event": "admin_login_failed", "user": user[:64], "client_ip": client}})
        # held until this address may try again: a person never meets the 429 above
        await asyncio.sleep(page.throttle.failed(client or "-"))
        token = page.sessions.login_token()
        response = page.html("login.html", 401, token=token, error="Wrong user name or password.", user=user,
                             no_users=len(page.users) == 0)
        set_cookie(response, request, LOGIN_COOKIE, token, 3600)
        return response

    async def posted(request: Request) -> tuple[Any, Any, Response | None]:
        """The session and form of a state-changing POST, or the answer that refuses it: no
        session, or a form without the session's CSRF token."""
        session = page.sessions.find(request.cookies.get(SESSION_COOKIE))
        form = await request.form()
        if session is None:
            return None, form, to_login()
        if not _same(str(form.get("csrf", "")), session.csrf):
            return session, form, page.html(
                "error.html", 403, session=session, title="Refused",
                message="This request did not carry the page's token (CSRF); reload the page and try again.")
        return session, form, None

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        session, form, refused = await posted(request)
        if refused is not None:
            return refused
        page.sessions.end(request.cookies.get(SESSION_COOKIE))
        response = to_login()
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @app.get("/")
    async def fleet(request: Request) -> Response:
        session = page.sessions.find(request.cookies.get(SESSION_COOKIE))
        if session is None:
            return to_login()
        args = request.query_params
        fleet_filter, stale_text, problems = _fleet_filter(args)
        try:
            found = await _fleet.fleet_page(page.engine, fleet_filter, after=args.get("after"),
                                            before=args.get("before"))
            summary = await _fleet.summary(page.engine, stale_after=fleet_filter.stale or _fleet.DAY)
        except SQLAlchemyError as exc:
            return page.html("error.html", 503, session=session, title="Inventory unavailable",
                             message=f"The inventory database cannot be read (setting 'database'): {_first(exc)}")
        check_problems = await asyncio.to_thread(page.problems_of_check)
        return page.html(
            "fleet.html", session=session, page=found, summary=summary, filter=fleet_filter,
            stale_text=stale_text, no_backup_text=args.get("nobackup", "").strip(), text=args.get("q", ""), problems=problems, check_problems=check_problems,
            sorts=_fleet.SORT_LABELS, link=lambda **changes: _link(args, **changes),
        )

    @app.get("/devices/{key}")
    async def device(request: Request, key: str) -> Response:
        session = page.sessions.find(request.cookies.get(SESSION_COOKIE))
        if session is None:
            return to_login()
        try:
            facts = await _fleet.device_facts(page.engine, key)
            history = await _fleet.device_history(page.engine, key) if facts else []
        except SQLAlchemyError as exc:
            return page.html("error.html", 503, session=session, title="Inventory unavailable",
                             message=f"The inventory database cannot be read (setting 'database'): {_first(exc)}")
        if facts is None:
            return page.html("error.html", 404, session=session, title="No such device",
                             message=f"The inventory knows no device {key!r}.")
        reveal = request.query_params.get("reveal") == "1"
        if reveal:
            log.warning("admin shows secrets", extra={"fields": {
                "event": "admin_reveal", "user": session.user, "device": key, "client_ip": page.client_ip(request)}})
        reported = next((p.check_reported for p in history if p.status == 200), None)
        script = await asyncio.to_thread(page.would_get, facts.hwid or facts.key, facts.path or "/", reported, reveal,
                                         {"PROT": facts.firmware, "BOOT": facts.boot})
        mac = facts.mac or facts.key
        args = request.query_params
        try:
            firmware = await _device.firmware_state(page.engine, facts.key, facts.model)
            kept = await _device.backups(page.engine, settings.database, mac)
            pair = _device.chosen_pair(kept.versions, args.get("old"), args.get("new"))
            diff = await _device.diff(page.engine, settings.database, mac, *pair) if pair else None
        except SQLAlchemyError as exc:
            return page.html("error.html", 503, session=session, title="Inventory unavailable",
                             message=f"The inventory database cannot be read (setting 'database'): {_first(exc)}")
        rows = await asyncio.to_thread(_diff_shown, diff, reveal, script.get("secret_values", [])) if diff else None
        certificates_at, certificates = _device.certificates(kept.facts)
        return page.html("device.html", session=session, device=facts, history=history, script=script,
                         firmware=firmware, kind_names=_device.KIND_NAMES, backups=kept, pair=pair,
                         diff=rows, reveal=reveal,
                         certificates=certificates, certificates_at=certificates_at)

    @app.post("/firmware/resume")
    async def resume_firmware(request: Request) -> Response:
        session, form, refused = await posted(request)
        if refused is not None:
            return refused
        model, kind = str(form.get("model", "")).strip(), str(form.get("kind", ""))
        if not model or kind not in _device.KIND_NAMES:
            return page.html("error.html", 400, session=session, title="Nothing to resume",
                             message="Resume needs a model and a kind (prot or boot).")
        try:
            resumed = await RolloutState(page.engine).resume(model, [kind], time.time(), by=f"admin page: {session.user}"[:64])
        except SQLAlchemyError as exc:
            return page.html("error.html", 503, session=session, title="Inventory unavailable",
                             message=f"The inventory database cannot be written (setting 'database'): {_first(exc)}")
        log.warning("admin resumed a firmware rollout", extra={"fields": {
            "event": "admin_firmware_resume", "user": session.user, "model": model[:64], "kind": kind,
            "builds": [build for _, _, build in resumed], "client_ip": page.client_ip(request)}})
        return RedirectResponse("/", status_code=303)

    @app.api_route("/{rest:path}", methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"])
    def not_found(request: Request, rest: str) -> Response:
        # The admin listener answers its own pages only: no path here is a device poll.
        session = page.sessions.find(request.cookies.get(SESSION_COOKIE))
        if session is None:
            return to_login()
        return page.html("error.html", 404, session=session, title="Not found",
                         message="There is no such page here.")

    return app


def _same(a: str, b: str) -> bool:
    import secrets
    return bool(a) and secrets.compare_digest(a, b)


def _diff_shown(diff: str, reveal: bool, secret_values: list[str]) -> list[tuple[str, str]]:
    """The diff's rows for the device page. Unless revealed, the device's own text is masked: its
    secret variables' values and what its syntax marks secret (when the script cannot be
    rendered, the variables are unknown: the syntax only). Linear in two whole configurations:
    run off the event loop."""
    if not reveal:
        diff = _script.hide(_script.mask_config(diff), secret_values)
    return _device.diff_rows(diff)


def _first(exc: BaseException) -> str:
    original = getattr(exc, "orig", None) or exc
    return str(original).splitlines()[0] if str(original) else type(original).__name__


def _fleet_filter(args: Any) -> tuple[_fleet.FleetFilter, str, list[str]]:
    """The filter the query string asks for, and what in it could not be used (said on the page)."""
    problems: list[str] = []
    status: int | None = None
    if args.get("status"):
        try:
            status = int(args["status"])
            check_status(status)   # the CLI's rule: 100 to 599, also what any database can hold
        except ValueError:
            problems.append(f"status {args['status'][:20]!r} is not an HTTP status; showing every status")
        except InventoryError as exc:
            status = None
            problems.append(f"{exc}; showing every status")
    stale_text = args.get("stale", "").strip()
    stale = _asked_duration(stale_text, problems)
    no_backup = _asked_duration(args.get("nobackup", "").strip(), problems)
    sort = args.get("sort", "last_seen")
    if sort not in _fleet.SORTS:
        sort = "last_seen"
    descending = args.get("order", "desc" if sort == "last_seen" else "asc") != "asc"
    if any(args.get(way) and _fleet.read_cursor(args[way], sort) is None for way in ("after", "before")):
        problems.append("the page link is not one this page made; showing the first page")
    return _fleet.FleetFilter(
        model=args.get("model", "").strip() or None, status=status, stale=stale, no_backup=no_backup,
        text=args.get("q", "").strip()[:100] or None, sort=sort, descending=descending,  # type: ignore[arg-type]
    ), stale_text, problems


def _asked_duration(text: str, problems: list[str]) -> float | None:
    """Seconds of a duration the query string gave (`7d`), None when it gave none; what cannot
    be read goes into `problems`, to be said on the page."""
    if not text:
        return None
    try:
        return parse_duration(text)
    except InventoryError as exc:
        problems.append(str(exc))
        return None


def _link(args: Any, **changes: Any) -> str:
    """This page's URL with some query arguments changed (None drops one); paging starts over
    unless a cursor is among the changes."""
    query = {key: value for key, value in args.items() if key not in ("after", "before")}
    for key, value in changes.items():
        if value is None or value == "":
            query.pop(key, None)
        else:
            query[key] = str(value)
    return "/?" + urllib.parse.urlencode(query) if query else "/"
