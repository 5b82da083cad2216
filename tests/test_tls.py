"""The built-in listener, proven with real TLS handshakes against uvicorn on a loopback port.

First the shim alone (a tiny echo app shows what reaches the scope), then the real app: the
same device gets the same script as through a terminator, and no header can speak for it.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from ports import free_port

from configserver import create_app, load_settings
from configserver.cli import main
from configserver.lab.pki import CertificateAuthority, IssuedCert
from configserver.limits import (
    GuardedH11Protocol,
    GuardedHttpToolsProtocol,
    Listener,
    ListenerLimits,
)
from configserver.settings import SettingsError
from configserver.tls import (
    ServerTLS,
    is_device_listener,
    server_ssl_context,
    uvicorn_options,
)

# The session's lab PKI (conftest's `pki` fixture): ca1, ca2, phone, gateway, broken, expired, forged...
LabPKI = Any

PROTOCOLS = ["h11", "httptools"]
by_protocol = pytest.mark.parametrize("protocol", PROTOCOLS)
by_version = pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["TLS1.3", "TLS1.2"])


def listener_options(listener: Listener, protocol: str = "httptools") -> dict[str, Any]:
    guarded = {"h11": GuardedH11Protocol, "httptools": GuardedHttpToolsProtocol}[protocol]
    return {"http": functools.partial(guarded, listener=listener),
            "timeout_keep_alive": listener.limits.keep_alive_timeout,
            "h11_max_incomplete_event_size": listener.limits.max_request_head_bytes, "ws": "none"}


# -- a lab server certificate, and files for every certificate ----------------------------------


class Files:
    """PEM files of the test PKI, written once per session."""

    def __init__(self, root: Path, pki: LabPKI) -> None:
        self.root = root
        self.server_ca = CertificateAuthority.named("test server CA")
        server = self.server_ca.issue_server(["localhost", "127.0.0.1"])
        self.server_cert, self.server_key = root / "server.pem", root / "server.key"
        server.write(self.server_cert, self.server_key)
        self.server_ca_pem = root / "server-ca.pem"
        self.server_ca_pem.write_bytes(self.server_ca.cert_pem)
        self.bundle = root / "device-cas.pem"
        self.bundle.write_bytes(pki.bundle_pem())

    def device(self, cert: IssuedCert) -> tuple[Path, Path]:
        cn = cert.certificate.subject.rfc4514_string().replace(",", "_").replace("=", "-")
        stem = f"{cn}-{cert.certificate.serial_number:x}"
        paths = self.root / f"{stem}.pem", self.root / f"{stem}.key"
        if not paths[0].exists():
            cert.write(*paths)
        return paths

    def server_tls(self, **options: Any) -> ServerTLS:
        return ServerTLS(self.server_cert, self.server_key, self.bundle, **options)

    def listener(self, protocol: str = "httptools", tls: bool = True, **limits: Any) -> dict[str, Any]:
        """uvicorn options for the built-in listener (or, `tls=False`, the plain one) alone."""
        return listener_options(Listener(ListenerLimits(**limits), self.server_tls() if tls else None), protocol)

    def settings(self, site_root: Path | None = None, **overrides: Any):
        values: dict[str, Any] = dict(tls_cert=self.server_cert, tls_key=self.server_key, ca_bundle=self.bundle)
        if site_root is not None:
            # apply_once would append its check lines: these tests pin the script itself
            values.update(templates=site_root / "templates", vars=site_root / "vars", grace_seconds=0,
                          apply_once=False)
        values.update(overrides)
        return load_settings(**values)


@pytest.fixture(scope="session")
def files(pki: LabPKI, tmp_path_factory: pytest.TempPathFactory) -> Files:
    return Files(tmp_path_factory.mktemp("tls"), pki)


# -- uvicorn on a free loopback port, in a thread --------------------------------------------------


@contextlib.contextmanager
def listening(app: Any, **uvicorn_kwargs: Any) -> Iterator[int]:
    """Serve `app` with uvicorn on a free loopback port; yields the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    config = uvicorn.Config(app, log_level="warning", proxy_headers=False, **uvicorn_kwargs)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class EchoApp:
    """Answers every request with the TLS extension it saw, as JSON; counts requests."""

    def __init__(self) -> None:
        self.requests = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.requests += 1
        extensions = scope.get("extensions") or {}
        body = json.dumps({"tls": extensions.get("tls"), "has_tls": "tls" in extensions}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


# -- a device-side client ------------------------------------------------------------------------


def device_context(
    files: Files,
    device: IssuedCert | None,
    *,
    maximum_version: ssl.TLSVersion | None = None,
    minimum_version: ssl.TLSVersion | None = None,
    legacy: bool = False,
) -> ssl.SSLContext:
    """What a device brings: its certificate, and trust in the server's CA. `legacy` lets the
    client side accept everything old firmware might do, so that only the server decides."""
    context = ssl.create_default_context(cafile=str(files.server_ca_pem))
    if legacy:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if minimum_version is not None:
            context.minimum_version = minimum_version
        if maximum_version is not None:
            context.maximum_version = maximum_version
    if device is not None:
        context.load_cert_chain(*files.device(device))
    return context


def get(port: int, context: ssl.SSLContext, path: str = "/", headers: dict[str, str] | None = None,
        requests: int = 1) -> list[tuple[int, bytes]]:
    """`requests` GETs on one keep-alive connection; (status, body) of each."""
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    answers = []
    try:
        for _ in range(requests):
            connection.request("GET", path, headers=headers or {})
            response = connection.getresponse()
            answers.append((response.status, response.read()))
    finally:
        connection.close()
    return answers


def refused(port: int, context: ssl.SSLContext) -> str:
    """How the connection ended, asserting that no HTTP answer came back.

    With TLS 1.2 the server's verdict on the client certificate ends the handshake itself; with
    TLS 1.3 the client's side of the handshake completes first and the server then closes the
    connection before reading a request (uvicorn sends no alert in either case).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
        except (ssl.SSLError, ConnectionError) as exc:
            return f"handshake failed: {exc}"
        with tls:
            try:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                data = tls.recv(65536)
            except (ssl.SSLError, ConnectionError) as exc:
                return f"closed after the handshake: {exc}"
            assert data == b"", f"the server answered: {data[:200]!r}"
            return "closed after the handshake"


# -- the shim: what reaches the scope ------------------------------------------------------------


@by_protocol
@by_version
def test_the_verified_client_certificate_reaches_the_scope(files: Files, pki: LabPKI, protocol: str,
                                                           version: ssl.TLSVersion) -> None:
    app = EchoApp()
    context = device_context(files, pki.phone, maximum_version=version)
    with listening(app, **files.listener(protocol)) as port:
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        connection.request("GET", "/")
        response = connection.getresponse()
        tls = json.loads(response.read())["tls"]
        cipher_name = connection.sock.cipher()[0]
        connection.close()

    assert tls["client_cert_chain"] == [pki.phone.cert_pem.decode()]
    assert tls["client_cert_name"] == "CN=IP232-30-00-af,O=innovaphone,C=DE"
    assert tls["client_cert_error"] is None
    assert tls["server_cert"] is None
    assert tls["tls_version"] == {ssl.TLSVersion.TLSv1_3: 0x0304, ssl.TLSVersion.TLSv1_2: 0x0303}[version]
    iana = {c["name"]: c["id"] & 0xFFFF for c in context.get_ciphers()}[cipher_name]
    assert tls["cipher_suite"] == iana


@by_protocol
def test_every_request_on_a_keep_alive_connection_carries_the_extension(files: Files, pki: LabPKI,
                                                                        protocol: str) -> None:
    app = EchoApp()
    with listening(app, **files.listener(protocol)) as port:
        answers = get(port, device_context(files, pki.gateway), requests=3)
    assert app.requests == 3
    names = [json.loads(body)["tls"]["client_cert_name"] for _, body in answers]
    assert names == ["CN=IP1202-35-fe-4d,O=innovaphone,C=DE"] * 3


@by_protocol
def test_plain_http_gets_no_tls_extension(files: Files, protocol: str) -> None:
    app = EchoApp()
    with listening(app, **files.listener(protocol, tls=False)) as port:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/")
        answer = json.loads(connection.getresponse().read())
        connection.close()
    assert answer == {"tls": None, "has_tls": False}


@by_protocol
def test_devices_of_both_innovaphone_cas_are_served(files: Files, pki: LabPKI, protocol: str) -> None:
    app = EchoApp()
    with listening(app, **files.listener(protocol)) as port:
        for device in (pki.phone, pki.gateway, pki.broken):
            [(status, body)] = get(port, device_context(files, device))
            assert status == 200
            assert json.loads(body)["tls"]["client_cert_chain"] == [device.cert_pem.decode()]


@by_version
@pytest.mark.parametrize("who", ["forged", "unrelated", "expired", "no certificate"])
def test_bad_or_missing_client_certificates_are_refused_in_the_handshake(files: Files, pki: LabPKI, who: str,
                                                                         version: ssl.TLSVersion) -> None:
    device = {"forged": pki.forged, "unrelated": pki.unrelated, "expired": pki.expired,
              "no certificate": None}[who]
    app = EchoApp()
    with listening(app, **files.listener()) as port:
        how = refused(port, device_context(files, device, maximum_version=version))
    if version == ssl.TLSVersion.TLSv1_2:
        assert how.startswith("handshake failed")
    assert app.requests == 0


# -- the server context from settings ------------------------------------------------------------


def test_the_header_path_gets_the_listener_limits_without_tls() -> None:
    options = uvicorn_options(load_settings(keep_alive_timeout=3, max_request_head_bytes=20000))
    assert options["http"].keywords["listener"] == Listener(ListenerLimits(keep_alive_timeout=3,
                                                                           max_request_head_bytes=20000))
    assert (options["timeout_keep_alive"], options["h11_max_incomplete_event_size"]) == (3, 20000)
    assert "ssl_context_factory" not in options


def test_a_keep_alive_the_head_timeout_cuts_short_is_told_at_start(caplog: pytest.LogCaptureFixture) -> None:
    # an idle connection after an answer waits for its next head: request_head_timeout ends it
    with caplog.at_level(logging.WARNING, logger="configserver.listener"):
        uvicorn_options(load_settings(keep_alive_timeout=15))
        uvicorn_options(load_settings(keep_alive_timeout=15, request_head_timeout=15))
    assert [(r.fields["event"], r.fields["keep_alive_timeout"], r.fields["request_head_timeout"])
            for r in caplog.records] == [("keep_alive_cut_short", 15, 10)]


def test_built_in_tls_without_a_ca_bundle_stops_start_up(files: Files) -> None:
    settings = load_settings(tls_cert=files.server_cert, tls_key=files.server_key)
    with pytest.raises(SettingsError, match="'ca_bundle'"):
        uvicorn_options(settings)
    with pytest.raises(SettingsError, match="'ca_bundle'"):
        server_ssl_context(settings)


def test_serve_names_the_missing_ca_bundle(files: Files, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # serve hands its config file to worker processes through the environment: undo that after
    monkeypatch.setenv("CONFIGSERVER_CONFIG_FILE", "")
    config = tmp_path / "configserver.toml"
    config.write_text(f'tls_cert = "{files.server_cert}"\ntls_key = "{files.server_key}"\n')
    assert main(["--config", str(config), "serve"]) == 2
    assert "ca_bundle" in capsys.readouterr().err


def test_a_key_that_does_not_match_the_certificate_names_the_settings(files: Files, pki: LabPKI) -> None:
    _, other_key = files.device(pki.phone)
    settings = files.settings(tls_key=other_key)
    with pytest.raises(SettingsError, match="'tls_cert'/'tls_key'"):
        uvicorn_options(settings)


def test_old_tls_versions_need_the_lowest_security_level(files: Files) -> None:
    with pytest.raises(SettingsError, match="'tls_min_version'.*tls_security_level = 0"):
        server_ssl_context(files.settings(tls_min_version="TLSv1"))
    context = server_ssl_context(files.settings(tls_min_version="TLSv1", tls_security_level=0))
    assert context.minimum_version == ssl.TLSVersion.TLSv1


def test_the_server_context_requires_a_client_certificate(files: Files) -> None:
    context = server_ssl_context(files.settings())
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert len(context.get_ca_certs()) == 2


def test_uvicorn_options_survive_the_trip_to_a_worker_process(files: Files) -> None:
    import pickle

    options = uvicorn_options(files.settings())
    protocol = pickle.loads(pickle.dumps(options["http"]))
    assert protocol.func is GuardedHttpToolsProtocol
    assert protocol.keywords["listener"].ssl_context().verify_mode == ssl.CERT_REQUIRED


def test_files_replaced_after_start_up_leave_the_checked_context_in_use(files: Files, pki: LabPKI,
                                                                        tmp_path: Path) -> None:
    # a renewal that writes the certificate before its key: the running server goes on serving
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(files.server_cert.read_bytes())
    key.write_bytes(files.server_key.read_bytes())
    options = uvicorn_options(files.settings(tls_cert=cert, tls_key=key))
    files.server_ca.issue_server(["localhost"]).write(cert, tmp_path / "renewed.key")
    with listening(EchoApp(), **options) as port:
        assert get(port, device_context(files, pki.phone))[0][0] == 200


def test_a_listener_that_cannot_build_its_context_says_why_once(files: Files, pki: LabPKI, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    # the files checked at start-up, replaced before this process built its context: no device
    # can connect, which is not a client's failed handshake (those are debug lines)
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    files.server_ca.issue_server(["localhost"]).write(cert, tmp_path / "renewed.key")
    key.write_bytes(files.server_key.read_bytes())
    listener = Listener(ListenerLimits(), ServerTLS(cert, key, files.bundle))
    with caplog.at_level(logging.DEBUG, logger="configserver"), listening(EchoApp(), **listener_options(listener)) as port:
        for _ in range(3):
            assert refused(port, device_context(files, pki.phone)).startswith(("handshake failed", "closed"))
    told = [r.getMessage() for r in caplog.records if r.name.startswith("configserver") and r.levelno >= logging.WARNING]
    assert len(told) == 1 and told[0].startswith("no TLS handshake can succeed: setting 'tls_cert'/'tls_key'"), told


def test_a_worker_builds_its_context_as_it_starts(files: Files, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # uvicorn spawns workers: the listener reaches each pickled, and is unpickled as it starts
    import pickle

    from configserver import limits
    good = pickle.dumps(uvicorn_options(files.settings())["http"].keywords["listener"])
    broken = ServerTLS(tmp_path / "gone.pem", tmp_path / "gone.key", files.bundle)
    monkeypatch.setattr(limits, "_contexts", {})   # a new process
    listener = pickle.loads(good)
    assert limits._contexts[listener.tls].verify_mode == ssl.CERT_REQUIRED
    assert pickle.loads(pickle.dumps(Listener(ListenerLimits(), broken))).tls == broken   # its handshakes say why
    assert broken not in limits._contexts


# -- legacy devices: what tls_security_level and tls_min_version admit --------------------------


def _admitted(files: Files, device: IssuedCert, settings_overrides: dict[str, Any], **client: Any) -> bool:
    settings = files.settings(**settings_overrides)
    app = EchoApp()
    with listening(app, **uvicorn_options(settings)) as port:
        context = device_context(files, device, legacy=True, **client)
        try:
            [(status, _)] = get(port, context)
        except (ssl.SSLError, ConnectionError, http.client.RemoteDisconnected):
            return False
    return status == 200 and app.requests == 1


def test_rsa_1024_device_certificates_need_a_lower_security_level(files: Files, pki: LabPKI) -> None:
    old_phone = pki.ca1.issue_device("IP232-30-00-b2", key_bits=1024)
    assert not _admitted(files, old_phone, {})
    assert _admitted(files, old_phone, {"tls_security_level": 1})


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to sign with SHA-1")
def test_sha1_signed_device_certificates_need_security_level_0(files: Files, pki: LabPKI, tmp_path: Path) -> None:
    # cryptography no longer signs with SHA-1; old devices' certificates are, so openssl makes one.
    ca_cert, ca_key = tmp_path / "ca.pem", tmp_path / "ca.key"
    ca_cert.write_bytes(pki.ca1.cert_pem)
    ca_key.write_bytes(pki.ca1.key_pem)
    (tmp_path / "ext.cnf").write_text("extendedKeyUsage = clientAuth\n")
    key, csr, cert = tmp_path / "old.key", tmp_path / "old.csr", tmp_path / "old.pem"
    openssl = functools.partial(subprocess.run, check=True, capture_output=True)
    openssl(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
             "-subj", "/C=DE/O=innovaphone/CN=IP222s-30-00-b1"])
    openssl(["openssl", "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-set_serial", "7",
             "-sha1", "-days", "30", "-extfile", tmp_path / "ext.cnf", "-out", cert])
    old_phone = IssuedCert(
        x509.load_pem_x509_certificate(cert.read_bytes()),
        serialization.load_pem_private_key(key.read_bytes(), None),  # type: ignore[arg-type]
        pki.ca1.cert_pem,
    )
    assert old_phone.certificate.signature_hash_algorithm.name == "sha1"
    assert not _admitted(files, old_phone, {"tls_security_level": 1})
    assert _admitted(files, old_phone, {"tls_security_level": 0})


def test_tls_1_0_needs_the_minimum_version_and_security_level_0(files: Files, pki: LabPKI) -> None:
    tls10 = {"minimum_version": ssl.TLSVersion.TLSv1, "maximum_version": ssl.TLSVersion.TLSv1}
    assert not _admitted(files, pki.phone, {}, **tls10)
    assert not _admitted(files, pki.phone, {"tls_security_level": 0}, **tls10)
    assert _admitted(files, pki.phone, {"tls_security_level": 0, "tls_min_version": "TLSv1"}, **tls10)


# -- the real app behind the built-in listener ----------------------------------------------------


@pytest.fixture
def served_site(site: Any) -> Any:
    site.write("templates/default.j2", "# default for {{ device.hwid }}\nconfig change UP1 /poll {{ vars.poll }}\n")
    site.write("templates/models/IP222.j2", "# IP222 {{ device.hwid }} ({{ device.cn }})\n")
    site.write(
        "templates/devices/IP232-30-00-af.j2",
        "# own script of {{ device.hwid }} {{ device.mac }}\nmod cmd UP1 setvar desk {{ vars.desk }}\n"
        "# asked for {{ request.path }} from {{ request.client_ip }}\n",
    )
    site.write("vars/default.toml", "poll = 15\ndesk = 'none'\n")
    site.write("vars/devices/IP232-30-00-af.toml", "desk = 'reception'\n")
    return site


@contextlib.contextmanager
def built_in_tls(files: Files, site: Any, protocol: str | None = None) -> Iterator[int]:
    settings = files.settings(site.root)
    app = create_app(settings)
    with listening(app, **uvicorn_options(settings, http=protocol or "auto")) as port:
        yield port


def nginx_headers(device: IssuedCert) -> dict[str, str]:
    """What the nginx sample config forwards for a verified device."""
    cert = device.certificate
    return {
        "X-SSL-Client-Verify": "SUCCESS",
        "X-SSL-Client-S-DN": cert.subject.rfc4514_string(),
        "X-SSL-Client-I-DN": cert.issuer.rfc4514_string(),
        "X-SSL-Client-Cert": urllib.parse.quote(device.cert_pem.decode(), safe=""),
    }


@by_protocol
def test_device_gets_the_same_script_as_through_a_terminator(files: Files, pki: LabPKI, served_site: Any,
                                                             protocol: str) -> None:
    behind_terminator = create_app(load_settings(
        templates=served_site.templates, vars=served_site.vars, ca_bundle=files.bundle, grace_seconds=0,
        apply_once=False))
    with built_in_tls(files, served_site, protocol) as port, listening(behind_terminator) as plain_port:
        for device in (pki.phone, pki.gateway, pki.broken):
            [(status, body)] = get(port, device_context(files, device), "/update")
            plain = http.client.HTTPConnection("127.0.0.1", plain_port, timeout=10)
            plain.request("GET", "/update", headers=nginx_headers(device))
            response = plain.getresponse()
            assert (status, body) == (response.status, response.read())
            plain.close()
            assert status == 200
    # and what they are: the phone its own script, the gateway the default one, the broken CN fixed
    with built_in_tls(files, served_site) as port:
        [(_, phone)] = get(port, device_context(files, pki.phone), "/update")
        [(_, gateway)] = get(port, device_context(files, pki.gateway))
        [(_, broken)] = get(port, device_context(files, pki.broken))
    assert phone == (b"# own script of IP232-30-00-af 00-90-33-30-00-af\r\n"
                     b"mod cmd UP1 setvar desk reception\r\n# asked for /update from 127.0.0.1\r\n")
    assert gateway == b"# default for IP1202-35-fe-4d\r\nconfig change UP1 /poll 15\r\n"
    assert broken == b"# IP222 IP222-30-00-b0 (IP222s-30-00-b0)\r\n"


def test_the_device_query_is_still_checked(files: Files, pki: LabPKI, served_site: Any) -> None:
    with built_in_tls(files, served_site) as port:
        [(status, body)] = get(port, device_context(files, pki.phone), "/update?hwid=IP232-30-00-b0")
    assert (status, body) == (403, b"# device mismatch\n")


def test_spoofed_terminator_headers_are_ignored(files: Files, pki: LabPKI, served_site: Any) -> None:
    gateway = pki.gateway.certificate
    spoofed = {
        "X-SSL-Client-Verify": "SUCCESS",
        "X-SSL-Client-S-DN": gateway.subject.rfc4514_string(),
        "X-SSL-Client-I-DN": gateway.issuer.rfc4514_string(),
        "X-SSL-Client-Cert": urllib.parse.quote(pki.gateway.cert_pem.decode(), safe=""),
        "X-SSL-Client-S-DN-CN": "IP1202-35-fe-4d",
        "X-Forwarded-For": "6.6.6.6",
    }
    with built_in_tls(files, served_site) as port:
        [(status, body)] = get(port, device_context(files, pki.phone), "/", headers=spoofed)
        [(plain_status, plain_body)] = get(port, device_context(files, pki.phone), "/")
    assert status == 200
    assert body.startswith(b"# own script of IP232-30-00-af")
    assert (status, body) == (plain_status, plain_body)


def test_serve_with_two_workers(files: Files, pki: LabPKI, served_site: Any, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "configserver.toml"
    config.write_text(
        f'templates = "{served_site.templates}"\nvars = "{served_site.vars}"\nca_bundle = "{files.bundle}"\n'
        f'tls_cert = "{files.server_cert}"\ntls_key = "{files.server_key}"\ngrace_seconds = 0\n'
    )
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIGSERVER_")}
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "configserver", "--config", str(config), "serve", "--workers", "2",
             "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
        )
    try:
        answers: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + 30
        while len(answers) < 8:
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                answers += get(port, device_context(files, pki.phone))
            except (ConnectionError, ssl.SSLError, http.client.HTTPException):
                time.sleep(0.2)
        assert {status for status, _ in answers} == {200}, answers
        assert len({body for _, body in answers}) == 1
        assert refused(port, device_context(files, pki.forged))
    finally:
        server.terminate()
        server.wait(15)
    assert log.read_text().count("Started server process") == 2


# -- which listener a request came through -------------------------------------------------------


class ListenerApp(EchoApp):
    """Answers whether the request came through the devices' built-in listener."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = json.dumps(is_device_listener(scope)).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


@by_protocol
def test_requests_over_the_built_in_listener_are_known_as_the_devices(files: Files, pki: LabPKI,
                                                                      protocol: str) -> None:
    with listening(ListenerApp(), **files.listener(protocol)) as port:
        [(_, over_tls)] = get(port, device_context(files, pki.phone), "/metrics")
    with listening(ListenerApp(), **files.listener(protocol, tls=False)) as port:
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        plain.request("GET", "/metrics")
        over_plain = plain.getresponse().read()
        plain.close()
    assert (json.loads(over_tls), json.loads(over_plain)) == (True, False)


@pytest.mark.parametrize("scope, expected", [
    ({"type": "http", "scheme": "https", "extensions": {"tls": {"client_cert_chain": []}}}, True),
    ({"type": "http", "scheme": "https"}, True),  # a server that terminates TLS but lacks the extension
    ({"type": "http", "scheme": "http", "extensions": {}}, False),  # the header path, or a local scraper
    ({"type": "http", "scheme": "http"}, False),
])
def test_is_device_listener_reads_the_transport_not_the_headers(scope: dict[str, Any], expected: bool) -> None:
    scope["headers"] = [(b"x-forwarded-proto", b"https")]  # never believed
    assert is_device_listener(scope) is expected


def test_metrics_are_not_served_to_devices_on_the_built_in_listener(files: Files, pki: LabPKI,
                                                                    served_site: Any) -> None:
    with built_in_tls(files, served_site) as port:
        [(status, body)] = get(port, device_context(files, pki.phone), "/metrics")
    assert status == 404 and b"configserver" not in body
