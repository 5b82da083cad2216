"""Uploads through the real web layer: the app served by uvicorn with its built-in mutual TLS,
a device asked in its poll's answer, then PUTting its configuration chunked, with its own
certificate. The same admission as a poll: the certificate's device and nobody else."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from configserver import create_app, load_settings, securitylog
from configserver.admission import NamedDevice
from configserver.identity import DeviceIdentity
from configserver.backups import BackupStore, device_target
from configserver.inventory import device_history
from configserver.lab.pki import CertificateAuthority, IssuedCert
from configserver.tls import uvicorn_options

SECRET = "s3cret-Passw0rd-4711"
CONFIG = (
    "config change IP0 /addr 10.0.0.5\r\n"
    f"config change PHONE /user-1 /name Reception /pwd {SECRET}\r\n"
    "vars create TLS0/TICKET/0 pb 0011\r\n"
    "config write\r\n"
).encode()
OWN = "/backup?mode=backup&hwid=IP232-30-00-af&sn=0090333000af"


class Lab:
    """Files for one session: the server's certificate and the devices'."""

    def __init__(self, root: Path, pki: Any) -> None:
        self.root = root
        self.server_ca = CertificateAuthority.named("backups test server CA")
        self.server_cert, self.server_key = root / "server.pem", root / "server.key"
        self.server_ca.issue_server(["localhost", "127.0.0.1"]).write(self.server_cert, self.server_key)
        self.server_ca_pem = root / "server-ca.pem"
        self.server_ca_pem.write_bytes(self.server_ca.cert_pem)
        self.bundle = root / "device-cas.pem"
        self.bundle.write_bytes(pki.bundle_pem())
        self._writing = threading.Lock()   # tests upload from several threads at once

    def context(self, device: IssuedCert) -> ssl.SSLContext:
        name = device.certificate.subject.rfc4514_string().split(",")[0].split("=")[1]
        cert, key = self.root / f"{name}.pem", self.root / f"{name}.key"
        with self._writing:   # never a file another thread is still writing
            if not cert.exists():
                device.write(cert, key)
        context = ssl.create_default_context(cafile=str(self.server_ca_pem))
        context.load_cert_chain(cert, key)
        return context


@pytest.fixture(scope="module")
def lab(pki: Any, tmp_path_factory: pytest.TempPathFactory) -> Lab:
    return Lab(tmp_path_factory.mktemp("backups-tls"), pki)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "templates").mkdir()
    (tmp_path / "vars").mkdir()
    (tmp_path / "templates" / "default.j2").write_text("config change UP1 /poll 15\nmod cmd UP1 setvar site lab\n")
    return tmp_path


def settings(lab: Lab, site: Path, **overrides: Any) -> Any:
    values: dict[str, Any] = dict(
        templates=site / "templates", vars=site / "vars", grace_seconds=0, ca_bundle=lab.bundle,
        tls_cert=lab.server_cert, tls_key=lab.server_key, database=f"sqlite:///{site / 'configserver.db'}",
        backup_url="https://127.0.0.1/backup", backup_max_bytes=64 * 1024,
    )
    values.update(overrides)
    return load_settings(**values)


@contextlib.contextmanager
def serving(config: Any) -> Iterator[tuple[int, Any]]:
    """The app for `config` with its built-in TLS on a free loopback port, backups ready."""
    app = create_app(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", proxy_headers=False, **uvicorn_options(config)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not (server.started and (app.backups is None or app.backups.asking.ready)):
        assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1], app
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def request(port: int, context: ssl.SSLContext, method: str, path: str, body: Any = None,
            chunked: bool = False) -> tuple[int, bytes]:
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        if chunked:
            connection.request(method, path, body=iter(body), encode_chunked=True)
        else:
            connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def chunks(data: bytes, size: int = 100) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def stored(database: str, mac: str = "00-90-33-30-00-af") -> list[int]:
    async def go() -> list[int]:
        store = BackupStore(database)
        try:
            return [v.number for v in await store.versions(mac)]
        finally:
            await store.close()
    return asyncio.run(go())


def ask_now(database: str, mac: str) -> None:
    async def go() -> None:
        store = BackupStore(database)
        await store.migrate()
        await store.request([device_target(mac)])
        await store.close()
    asyncio.run(go())


def test_a_device_asked_in_its_answer_uploads_chunked_and_it_is_stored(lab: Lab, site: Path, pki: Any) -> None:
    config = settings(lab, site)
    ask_now(config.database, "00-90-33-30-00-af")
    with serving(config) as (port, _):
        status, answer = request(port, lab.context(pki.phone), "GET", "/update")
        lines = answer.decode().split("\r\n")
        assert status == 200
        assert lines[0] == "mod cmd UP0 scfg https://127.0.0.1/backup?mode=backup&hwid=#h&sn=#m"
        assert lines[1].endswith("ser nop /always mod%20cmd%20X509%20xml-info")
        assert lines[2].endswith("ser nop /always mod%20cmd%20CMD0%20xml-info")
        serial = next(line.split()[-1] for line in lines if line.startswith("mod cmd UP1 check ser "))
        # the script's serial is the same whether or not the answer asks for a backup
        _, again = request(port, lab.context(pki.phone), "GET", "/update")
        assert not again.startswith(b"mod cmd UP0 scfg") and f"mod cmd UP1 check ser {serial}".encode() in again

        url = lines[0].split()[4].replace("https://127.0.0.1", "").replace("#h", "IP232-30-00-af").replace(
            "#m", "0090333000af")
        assert request(port, lab.context(pki.phone), "PUT", url, chunks(CONFIG), chunked=True) == (
            200, b"# stored: version 1\n")
        assert request(port, lab.context(pki.phone), "PUT", url, chunks(CONFIG.replace(b"0011", b"2233")),
                       chunked=True) == (200, b"# unchanged: version 1\n")
        x509 = b'<info><servercert><certificate subject_cn="IP232-30-00-af"/></servercert></info>'
        assert request(port, lab.context(pki.phone), "PUT",
                       "/backup?mode=query&id=x509&hwid=IP232-30-00-af&sn=0090333000af", x509) == (
            200, b"# facts kept\n")
    assert stored(config.database) == [1]


def test_an_upload_naming_another_device_is_refused_and_stores_nothing(lab: Lab, site: Path, pki: Any) -> None:
    config = settings(lab, site)
    with serving(config) as (port, _):
        other = "/backup?mode=backup&hwid=IP1202-35-fe-4d&sn=00903335fe4d"
        assert request(port, lab.context(pki.phone), "PUT", other, CONFIG) == (403, b"# device mismatch\n")
        assert request(port, lab.context(pki.phone), "PUT", "/backup?mode=backup&sn=00903335fe4d", CONFIG) == (
            403, b"# device mismatch\n")
        # the gateway's own upload goes under the gateway, whatever it claims to be in its body
        gateway = "/backup?mode=backup&hwid=IP1202-35-fe-4d&sn=00903335fe4d"
        assert request(port, lab.context(pki.gateway), "PUT", gateway, CONFIG)[0] == 200
    assert stored(config.database) == []
    assert stored(config.database, "00-90-33-35-fe-4d") == [1]


def test_an_oversized_body_is_refused_and_the_next_poll_is_served(lab: Lab, site: Path, pki: Any) -> None:
    config = settings(lab, site, backup_max_bytes=4096)
    big = CONFIG + b"config change PHONE /comment " + b"x" * 8192 + b"\r\n"
    with serving(config) as (port, _):
        assert request(port, lab.context(pki.phone), "PUT", OWN, chunks(big, 1000), chunked=True) == (
            413, b"# upload too large\n")
        assert request(port, lab.context(pki.phone), "PUT", OWN, big) == (413, b"# upload too large\n")
        status, answer = request(port, lab.context(pki.phone), "GET", "/update")
        assert status == 200 and b"mod cmd UP1 setvar site lab" in answer
    assert stored(config.database) == []


def test_a_body_cut_off_midway_stores_nothing(lab: Lab, site: Path, pki: Any) -> None:
    config = settings(lab, site)
    with serving(config) as (port, _):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with lab.context(pki.phone).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(f"PUT {OWN} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
                tls.sendall(b"%x\r\n%s\r\n" % (len(CONFIG), CONFIG))
                tls.sendall(b"400\r\nconfig change PHONE /user-2 /name half")   # and the device goes away
        time.sleep(0.3)
        assert request(port, lab.context(pki.phone), "GET", "/update")[0] == 200
    assert stored(config.database) == []


@pytest.mark.parametrize(("body", "answer"), [
    (b"\x00\x01\x02\x03 binary " + SECRET.encode(), (415, b"# upload is not text\n")),
    (b"", (400, b"# empty upload\n")),
])
def test_a_body_that_is_no_configuration_is_refused_clearly(
    lab: Lab, site: Path, pki: Any, body: bytes, answer: tuple[int, bytes], caplog: pytest.LogCaptureFixture,
) -> None:
    config = settings(lab, site)
    with caplog.at_level(logging.INFO), serving(config) as (port, _):
        assert request(port, lab.context(pki.phone), "PUT", OWN, body) == answer
    assert stored(config.database) == []
    assert SECRET not in caplog.text


def test_puts_elsewhere_and_without_backup_url_are_not_allowed(lab: Lab, site: Path, pki: Any) -> None:
    with serving(settings(lab, site)) as (port, _):
        assert request(port, lab.context(pki.phone), "PUT", "/update?mode=backup", CONFIG) == (
            405, b"# method not allowed\n")
    with serving(settings(lab, site, backup_url=None)) as (port, app):
        assert app.backups is None
        assert request(port, lab.context(pki.phone), "PUT", OWN, CONFIG) == (405, b"# method not allowed\n")
        status, answer = request(port, lab.context(pki.phone), "GET", "/update")
        assert status == 200 and b"scfg" not in answer


def test_uploads_are_logged_and_counted_without_their_content(
    lab: Lab, site: Path, pki: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    config = settings(lab, site)
    with caplog.at_level(logging.INFO), serving(config) as (port, app):
        request(port, lab.context(pki.phone), "PUT", OWN, CONFIG)
        metrics = app.registry.get_sample_value(
            "configserver_backup_uploads_total", {"what": "config", "status": "200", "reason": "stored"})
    records = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "backup_upload"]
    assert [(r.fields["hwid"], r.fields["status"], r.fields["reason"], r.fields["size"]) for r in records] == [
        ("IP232-30-00-af", 200, "stored", len(CONFIG))]
    assert metrics == 1.0
    assert SECRET not in caplog.text


def test_a_refused_upload_names_its_device_in_the_logs_and_the_device_history(
    lab: Lab, site: Path, pki: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    config = settings(lab, site)
    security = tmp_path / "security.log"
    securitylog.configure(security)
    try:
        with caplog.at_level(logging.INFO), serving(config) as (port, _):
            other = "/backup?mode=backup&hwid=IP1202-35-fe-4d&sn=00903335fe4d"
            assert request(port, lab.context(pki.phone), "PUT", other, CONFIG) == (403, b"# device mismatch\n")
    finally:
        securitylog.configure(None)
    [record] = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "backup_upload"]
    assert (record.fields["hwid"], record.fields["reason"]) == ("IP232-30-00-af", "device mismatch")
    [line] = security.read_text().splitlines()
    assert line.endswith(' refusal client=127.0.0.1 reason="device mismatch" hwid=IP232-30-00-af '
                         'path=/backup')
    [poll] = device_history(config.database, "IP232-30-00-af")
    assert (poll.status, poll.reason, poll.path) == (403, "device mismatch", "/backup")
    assert SECRET not in caplog.text + security.read_text()


def test_an_upload_is_admitted_with_the_clock_and_admission_of_a_poll(lab: Lab, site: Path, pki: Any) -> None:
    config = settings(lab, site)
    with serving(config) as (port, app):
        expiry = pki.phone.certificate.not_valid_after_utc.timestamp()
        app.clock = lambda: expiry + 86400   # the app's time says the certificate has expired
        assert request(port, lab.context(pki.phone), "GET", "/update") == (403, b"# certificate mismatch\n")
        assert request(port, lab.context(pki.phone), "PUT", OWN, CONFIG) == (403, b"# certificate mismatch\n")
        app.clock = time.time
        # whatever admits a poll admits an upload: here `render`'s admission naming the gateway
        app.pipeline.admission = NamedDevice(DeviceIdentity("IP1202-35-fe-4d", "IP1202", "00-90-33-35-fe-4d",
                                                            cn="IP1202-35-fe-4d", issuer="CN=lab"))
        assert request(port, lab.context(pki.phone), "PUT", OWN, CONFIG) == (403, b"# device mismatch\n")
        assert request(port, lab.context(pki.phone), "PUT", OWN.replace("IP232-30-00-af", "IP1202-35-fe-4d").replace(
            "0090333000af", "00903335fe4d"), CONFIG)[0] == 200
    assert stored(config.database) == []
    assert stored(config.database, "00-90-33-35-fe-4d") == [1]


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[Any]:
    from postgres import PostgresServer

    server = PostgresServer.create()
    yield server
    server.cleanup()


def test_two_app_instances_on_one_postgresql_take_uploads_of_one_device(
    lab: Lab, site: Path, pki: Any, postgres_server: Any,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    config = settings(lab, site, database=postgres_server.empty_database("backups_two_nodes"))
    bodies = [CONFIG.replace(b"Reception", f"desk-{i}".encode()) for i in range(12)]
    with serving(config) as (port_a, _), serving(config) as (port_b, _):
        def upload(i: int) -> tuple[int, bytes]:
            return request(port_a if i % 2 else port_b, lab.context(pki.phone), "PUT", OWN, chunks(bodies[i]),
                           chunked=True)
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(upload, range(12)))
        # the same configuration through both at once: one version, not two (a configuration
        # none of the twelve has: whichever of them was stored last, this one is new)
        again = CONFIG.replace(b"Reception", b"desk-both")
        with ThreadPoolExecutor(2) as pool:
            same = list(pool.map(lambda port: request(port, lab.context(pki.phone), "PUT", OWN, again),
                                 (port_a, port_b)))
    assert sorted(answers) == sorted((200, f"# stored: version {n}\n".encode()) for n in range(1, 13))
    assert sorted(body.split(b":")[0] for _, body in same) == [b"# stored", b"# unchanged"]
    assert stored(config.database) == list(range(13, 3, -1))   # the newest ten of thirteen
