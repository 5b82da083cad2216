"""Driving the app the way terminators do: their header forms, and requests straight into ASGI."""

from __future__ import annotations

import asyncio
import base64
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from configserver import create_app, load_settings
from configserver.app import ConfigServer
from configserver.lab.pki import IssuedCert


def _legacy(name) -> str:
    return "".join(f"/{a.rfc4514_attribute_name}={a.value}" for a in name)


def _oneline(name) -> str:
    return ", ".join(f"{a.rfc4514_attribute_name} = {a.value}" for a in name)


def terminator_headers(cert: IssuedCert, style: str = "apache") -> list[tuple[str, str]]:
    """The headers each terminator's sample config forwards for `cert`, verbatim in form."""
    c = cert.certificate
    pem = cert.cert_pem.decode()
    if style == "apache":        # RFC 2253 DNs, PEM with newlines as spaces
        return [("X-SSL-Client-Verify", "SUCCESS"), ("X-SSL-Client-S-DN", c.subject.rfc4514_string()),
                ("X-SSL-Client-I-DN", c.issuer.rfc4514_string()), ("X-SSL-Client-Cert", pem.replace("\n", " "))]
    if style == "nginx":         # RFC 2253 DNs, URL-escaped PEM
        return [("X-SSL-Client-Verify", "SUCCESS"), ("X-SSL-Client-S-DN", c.subject.rfc4514_string()),
                ("X-SSL-Client-I-DN", c.issuer.rfc4514_string()), ("X-SSL-Client-Cert", urllib.parse.quote(pem, safe=""))]
    if style == "lighttpd":      # oneline subject, no issuer, URL-escaped PEM with '/' literal
        return [("X-SSL-Client-Verify", "SUCCESS"), ("X-SSL-Client-S-DN", _oneline(c.subject)),
                ("X-SSL-Client-Cert", urllib.parse.quote(pem, safe="/"))]
    if style == "haproxy":       # legacy DNs, one line of base64 DER
        der = c.public_bytes(serialization.Encoding.DER)
        return [("X-SSL-Client-Verify", "SUCCESS"), ("X-SSL-Client-S-DN", _legacy(c.subject)),
                ("X-SSL-Client-I-DN", _legacy(c.issuer)), ("X-SSL-Client-Cert", base64.b64encode(der).decode())]
    if style == "dn-only":       # a terminator that forwards no certificate
        return [("X-SSL-Client-Verify", "SUCCESS"), ("X-SSL-Client-S-DN", c.subject.rfc4514_string()),
                ("X-SSL-Client-I-DN", c.issuer.rfc4514_string())]
    raise ValueError(style)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


def call(app: ConfigServer, path: str = "/", headers: list[tuple[str, str]] | None = None, **transport) -> Answer:
    """One HTTP request straight into the ASGI app, with full control over the transport facts."""
    return asyncio.run(acall(app, path, headers, **transport))


async def acall(
    app: ConfigServer,
    path: str = "/",
    headers: list[tuple[str, str]] | None = None,
    *,
    way: str = "listener",
    **transport,
) -> Answer:
    """`call` from a running event loop (beside the app's watcher, say).

    `way`: "listener" asks the app to answer at once first, as the listener does
    (limits.AnsweredAtOnce), and takes the ASGI way when it does not; "asgi" takes the ASGI way.
    """
    scope = request_scope(path, headers, **transport)
    method = scope["method"]
    if way == "listener":
        at_once = app.answer_at_once(scope)
        if at_once is not None:
            at_once.then()
            headers_sent = {k.decode(): v.decode() for k, v in at_once.headers}
            return Answer(at_once.status, headers_sent, b"" if method == "HEAD" else at_once.body)
    elif way != "asgi":
        raise ValueError(way)
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return Answer(start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body)


def request_scope(
    path: str = "/",
    headers: list[tuple[str, str]] | None = None,
    *,
    query: str = "",
    method: str = "GET",
    client: tuple[str, int] | None = ("127.0.0.1", 40000),
    server: tuple[str, int | None] = ("127.0.0.1", 8080),
    tls: dict | None = None,
) -> dict:
    """The ASGI scope of one request, as a listener makes it."""
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "https" if tls else "http", "path": path, "raw_path": path.encode(),
        "query_string": query.encode(), "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers or []],
        "client": client, "server": server, "extensions": {"tls": tls} if tls else {},
    }


@dataclass
class Site:
    """A templates and vars folder for one test, and apps built on it."""

    root: Path
    ca_bundle: Path

    @property
    def templates(self) -> Path:
        return self.root / "templates"

    @property
    def vars(self) -> Path:
        return self.root / "vars"

    def write(self, relative: str, text: str) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def app(self, **overrides) -> ConfigServer:
        settings = dict(templates=self.templates, vars=self.vars, ca_bundle=self.ca_bundle, grace_seconds=0)
        settings.update(overrides)
        app = create_app(load_settings(**settings))
        app.store.refresh()
        return app
