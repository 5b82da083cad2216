"""Configuration uploads through real Apache, nginx and lighttpd, started from their deploy/
samples, with lab device certificates: a device's own upload is stored, one naming another device
is refused, an oversized body is refused without harm to the next poll, a body cut off midway
stores nothing, and a PUT anywhere but the upload path never reaches the app."""

from __future__ import annotations

import asyncio
import http.client
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from terminator_lab import DEPLOY, App, Server, TLSLab, Terminator, fill_in, free_port, http_get, new_proxy_secret, write_secret_file

from configserver.backups import BackupStore

SECRET = "s3cret-Passw0rd-4711"
PHONE_MAC, GATEWAY_MAC = "00-90-33-30-00-af", "00-90-33-35-fe-4d"
OWN = "/backup?mode=backup&hwid=IP232-30-00-af&sn=0090333000af"
LIMIT = 4 * 1024 * 1024   # what the samples set, and backup_max_bytes' default


def config(name: str) -> bytes:
    return (
        "config change IP0 /addr 10.0.0.5\r\n"
        f"config change PHONE /user-1 /name {name} /pwd {SECRET}\r\n"
        f"vars create TLS0/TICKET/0 pb {name.encode().hex()}\r\n"
        "config write\r\n"
    ).encode()


def _fixtures() -> ModuleType:
    """The integration conftest, for its starters (pytest imports it under a name of its own)."""
    here = str(Path(__file__).with_name("conftest.py"))
    return next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == here)


def start_app_with_backups(name: str, lab_root: Path, site: Path, tls_lab: TLSLab, secret: str, *, uds: bool) -> tuple[App, str]:
    """The production settings sample filled in for this lab, with backups on; returns the app
    and its database URL."""
    fixtures = _fixtures()
    root = fixtures._readable_dir(lab_root / f"{name}-app", 0o700)
    database = f"sqlite:///{root / 'configserver.db'}"
    text = fill_in((DEPLOY / "configserver.production.toml").read_text(), {
        "templates": f'"{site / "templates"}"',
        "vars": f'"{site / "vars"}"',
        "ca_bundle": f'"{tls_lab.device_cas}"',
        "database": f'"{database}"',
        "proxy_secret": f'"{secret}"',
        "digest_key": f'"{new_proxy_secret()}"',
    })
    text += '\nbackup_url = "https://localhost/backup"\n'
    settings = write_secret_file(root / "configserver.toml", text)
    env = {key: value for key, value in __import__("os").environ.items() if not key.startswith("CONFIGSERVER_")}
    env["CONFIGSERVER_GRACE_SECONDS"] = "0"
    command = [*fixtures._configserver_command(), "--config", str(settings), "serve"]
    if uds:
        folder = fixtures._readable_dir(lab_root / f"{name}-socket", 0o750)
        fixtures._give_to_terminator_group(folder)
        app = App(Server(f"{name} app", [*command, "--uds", str(folder / "app.sock")], [], env), secret,
                  uds=folder / "app.sock")
    else:
        port = free_port()
        app = App(Server(f"{name} app", [*command, "--host", "127.0.0.1", "--port", str(port)], [], env), secret,
                  port=port)
    app.server.start(root / "output.log")

    def healthy() -> bool:
        try:
            return http_get("/healthz", port=app.port, uds=app.uds)[0] == 200
        except OSError:
            return False

    app.server.wait_until(healthy, "answer on /healthz")
    return app, database


@pytest.fixture(scope="module", params=["apache", "nginx", "lighttpd"])
def backups_behind(request: pytest.FixtureRequest, lab_root: Path, terminator_site: Path, tls_lab: TLSLab) -> Iterator[tuple[Terminator, str]]:
    """A terminator from its sample with an app that takes backups behind it; the database URL."""
    kind = request.param
    fixtures = _fixtures()
    fixtures.need_terminator(kind)
    secret = new_proxy_secret()
    name = f"{kind}-backups"
    app, database = start_app_with_backups(name, lab_root, terminator_site, tls_lab, secret,
                                           uds=fixtures.APP_ON_SOCKET[kind])
    try:
        server, port, sample = fixtures.STARTERS[kind](name, lab_root, tls_lab, app, secret)
        try:
            yield Terminator(kind, port, app, server, tls_lab, fixtures.REFUSALS[kind], secret, sample), database
        finally:
            server.stop()
    finally:
        app.server.stop()


def context(lab: TLSLab, device: str) -> ssl.SSLContext:
    credential = lab.devices[device]
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls.load_verify_locations(lab.server_ca)
    tls.load_cert_chain(credential.cert, credential.key)
    return tls


def put(terminator: Terminator, device: str, path: str, body: bytes, *, chunk: int = 1000) -> tuple[int, bytes]:
    """A device's PUT as innovaphone's update client sends it: chunked transfer encoding."""
    connection = http.client.HTTPSConnection("127.0.0.1", terminator.port, context=context(terminator.lab, device),
                                             timeout=20)
    try:
        parts = [body[i:i + chunk] for i in range(0, len(body), chunk)]
        connection.request("PUT", path, body=iter(parts), encode_chunked=True)
        response = connection.getresponse()
        return response.status, response.read()
    except (BrokenPipeError, ConnectionResetError, ssl.SSLError) as exc:
        # a terminator may answer 413 and close while the body is still being sent
        return 0, repr(exc).encode()
    finally:
        connection.close()


def versions(database: str, mac: str = PHONE_MAC) -> list[int]:
    async def go() -> list[int]:
        store = BackupStore(database)
        try:
            await store.migrate()   # the app may still be making its tables
            return [v.number for v in await store.versions(mac)]
        finally:
            await store.close()
    return asyncio.run(go())


def test_a_devices_own_chunked_upload_is_stored(backups_behind: tuple[Terminator, str]) -> None:
    terminator, database = backups_behind
    before = versions(database)
    status, answer = put(terminator, "phone", OWN, config(f"own-{terminator.name}"))
    assert (status, answer) == (200, f"# stored: version {len(before) + 1}\n".encode())
    assert versions(database) == [len(before) + 1, *before]
    assert put(terminator, "phone", OWN, config(f"own-{terminator.name}"))[1].startswith(b"# unchanged")


def test_an_upload_naming_another_device_is_refused(backups_behind: tuple[Terminator, str]) -> None:
    terminator, database = backups_behind
    before = versions(database), versions(database, GATEWAY_MAC)
    other = "/backup?mode=backup&hwid=IP1202-35-fe-4d&sn=00903335fe4d"
    assert put(terminator, "phone", other, config("intruder")) == (403, b"# device mismatch\n")
    assert (versions(database), versions(database, GATEWAY_MAC)) == before


def test_an_oversized_body_is_refused_and_the_next_poll_is_served(backups_behind: tuple[Terminator, str]) -> None:
    terminator, database = backups_behind
    before = versions(database)
    big = config("big") + b"config change PHONE /comment " + b"x" * LIMIT + b"\r\n"
    status, answer = put(terminator, "phone", OWN, big, chunk=64 * 1024)
    assert status == 413, answer
    # nginx and lighttpd refuse it themselves; Apache holds no proxied body to a limit, the app does
    assert (b"# upload too large" in answer) == (terminator.name == "apache")
    answer = terminator.poll("phone")
    assert answer.status == 200 and "IP232-30-00-af" in answer.body
    assert versions(database) == before


def test_a_body_cut_off_midway_stores_nothing(backups_behind: tuple[Terminator, str]) -> None:
    terminator, database = backups_behind
    before = versions(database)
    body = config(f"cut-{terminator.name}")
    with socket.create_connection(("127.0.0.1", terminator.port), timeout=10) as raw:
        with context(terminator.lab, "phone").wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(f"PUT {OWN} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
            tls.sendall(b"%x\r\n%s\r\n" % (len(body), body))
            tls.sendall(b"1000\r\nconfig change PHONE /user-2 /name half")   # and the device goes away
    time.sleep(1.0)
    assert versions(database) == before
    assert terminator.poll("phone").status == 200


def test_a_put_anywhere_else_never_reaches_the_app(backups_behind: tuple[Terminator, str]) -> None:
    terminator, database = backups_behind
    before = versions(database)
    status, _ = put(terminator, "phone", "/update?mode=backup&hwid=IP232-30-00-af&sn=0090333000af", config("elsewhere"))
    assert status == 403
    assert terminator.poll("phone", path="/backup").status == 403
    assert versions(database) == before
