"""Fixtures for the integration tests: a lab PKI on disk, the app, and Apache, nginx and lighttpd
in front of it, each started from its deploy/ sample.

Everything lives in one temporary folder that the terminators' workers (www-data when the tests
run as root) can read, except what holds the proxy secret: the filled-in samples (mode 0600, as
the samples say) and the app's settings. Each server and each app runs once per session, on free
loopback ports; all of them share one proxy secret, made afresh for the session.
"""

from __future__ import annotations

import contextlib
import grp
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from terminator_lab import (
    DEPLOY,
    VICTIM,
    App,
    Backend,
    Credential,
    EchoBackend,
    Server,
    Terminator,
    TLSLab,
    apache_main_conf,
    enable_old_devices,
    fill_in,
    find_binary,
    free_port,
    http_get,
    lighttpd_main_conf,
    new_proxy_secret,
    nginx_main_conf,
    running_as_root,
    tcp_open,
    write_secret_file,
)

from configserver.lab.pki import CertificateAuthority, IssuedCert, innovaphone_ca_name

TERMINATOR_GROUP = "www-data"

def need(found: object, what: str) -> None:
    """A missing server fails the run in CI (CI=true) and skips the test elsewhere."""
    if found:
        return
    message = f"{what} is not installed (scripts/install-test-servers installs it as root)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _readable_dir(path: Path, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    return path


def _give_to_terminator_group(path: Path) -> None:
    if running_as_root():
        os.chown(path, 0, grp.getgrnam(TERMINATOR_GROUP).gr_gid)


@pytest.fixture(scope="session")
def lab_root() -> Iterator[Path]:
    """A folder the terminators' workers can enter (pytest's own tmp folders are private)."""
    root = Path(tempfile.mkdtemp(prefix="configserver-terminators-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def proxy_secret() -> str:
    """The proxy secret filled into every terminator sample and the app's settings."""
    return new_proxy_secret()


# -- certificates ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tls_lab(lab_root: Path) -> TLSLab:
    """CA 1, CA 2, a forged CA 1, another vendor's CA, and a certificate for each test case."""
    folder = _readable_dir(lab_root / "pki")
    ca1 = CertificateAuthority.innovaphone(1)
    ca2 = CertificateAuthority.innovaphone(2)
    forged_ca = CertificateAuthority(innovaphone_ca_name(1))
    other_ca = CertificateAuthority.named("Other Device CA", "Some Other Vendor")
    server_ca = CertificateAuthority.named("configserver lab server CA")

    def keep(name: str, issued: IssuedCert) -> Credential:
        credential = Credential(issued, folder / f"{name}.crt", folder / f"{name}.key")
        issued.write(credential.cert, credential.key)
        return credential

    devices = {
        "phone": keep("phone", ca1.issue_device(VICTIM)),
        "gateway": keep("gateway", ca2.issue_device("IP1202-35-fe-4d")),
        "broken-cn": keep("broken-cn", ca2.issue_device("IP222s-30-00-b0")),
        # Each of these claims to be the phone above.
        "unrelated-ca": keep("unrelated-ca", other_ca.issue_device(VICTIM)),
        "forged-ca": keep("forged-ca", forged_ca.issue_device(VICTIM)),
        "expired": keep("expired", ca1.issue_device(VICTIM, expired=True)),
    }
    old = _old_device(folder, ca1)
    if old is not None:
        devices["old-device"] = old
    server = keep("server", server_ca.issue_server(["localhost", "127.0.0.1"]))
    (folder / "server-chain.pem").write_bytes(server.issued.chain_pem)
    (folder / "innovaphone-device-cas.pem").write_bytes(ca1.cert_pem + ca2.cert_pem)
    (folder / "server-ca.pem").write_bytes(server_ca.cert_pem)
    return TLSLab(
        device_cas=folder / "innovaphone-device-cas.pem",
        server_ca=folder / "server-ca.pem",
        server=server,
        server_chain=folder / "server-chain.pem",
        devices=devices,
    )


def _old_device(folder: Path, ca: CertificateAuthority) -> Credential | None:
    """An old device's certificate: X.509 v1, RSA-1024, signed with SHA-1 by CA 1.

    `cryptography` no longer signs with SHA-1, so `openssl` makes it (None when it is missing).
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    ca_cert, ca_key = folder / "ca1.crt", folder / "ca1.key"
    ca_cert.write_bytes(ca.cert_pem)
    ca_key.touch(mode=0o600)
    ca_key.write_bytes(ca.key_pem)
    cert, key, request = folder / "old-device.crt", folder / "old-device.key", folder / "old-device.csr"
    for command in (
        [openssl, "genrsa", "-out", str(key), "1024"],
        [openssl, "req", "-new", "-key", str(key), "-subj", "/C=DE/O=innovaphone/CN=IP222s-30-00-b1", "-out", str(request)],
        [openssl, "x509", "-req", "-in", str(request), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-sha1",
         "-days", "365", "-set_serial", "0x5ee1d", "-out", str(cert)],
    ):
        subprocess.run(command, check=True, capture_output=True, timeout=60)
    issued = IssuedCert(
        x509.load_pem_x509_certificate(cert.read_bytes()),
        serialization.load_pem_private_key(key.read_bytes(), password=None),
        ca.cert_pem,
    )
    return Credential(issued, cert, key)


# -- the app --------------------------------------------------------------------------------------

TEMPLATE = """\
# script for {hwid}
# hwid {{{{ device.hwid }}}}
# issued by {{{{ device.issuer }}}}
# client {{{{ request.client_ip }}}}
config change UP1 /url https://config.example.com/update
"""


@pytest.fixture(scope="session")
def terminator_site(lab_root: Path) -> Path:
    """Templates for the three good devices, and nothing for anyone else (no default.j2)."""
    root = _readable_dir(lab_root / "site")
    devices = _readable_dir(root / "templates" / "devices")
    _readable_dir(root / "vars")
    for hwid in (VICTIM, "IP1202-35-fe-4d", "IP222-30-00-b0"):
        (devices / f"{hwid}.j2").write_text(TEMPLATE.format(hwid=hwid))
    return root


def _configserver_command() -> list[str]:
    script = Path(sys.executable).parent / "configserver"
    return [str(script)] if script.exists() else [sys.executable, "-m", "configserver"]


def start_app(name: str, lab_root: Path, site: Path, tls_lab: TLSLab, proxy_secret: str, *, uds: bool) -> App:
    """Fill in deploy/configserver.production.toml for this lab and serve it."""
    root = _readable_dir(lab_root / f"{name}-app", 0o700)
    config = write_secret_file(root / "configserver.toml", fill_in(
        (DEPLOY / "configserver.production.toml").read_text(), {
            "templates": f'"{site / "templates"}"',
            "vars": f'"{site / "vars"}"',
            "ca_bundle": f'"{tls_lab.device_cas}"',
            "database": f'"sqlite:///{root / "configserver.db"}"',
            "proxy_secret": f'"{proxy_secret}"',
            "digest_key": f'"{new_proxy_secret()}"',
        },
    ))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIGSERVER_")}
    env["CONFIGSERVER_GRACE_SECONDS"] = "0"
    command = [*_configserver_command(), "--config", str(config), "serve"]
    if uds:
        # As the systemd unit sets it up: the socket's folder admits the terminator's group only.
        folder = _readable_dir(lab_root / f"{name}-socket", 0o750)
        _give_to_terminator_group(folder)
        server = Server(f"{name} app", [*command, "--uds", str(folder / "app.sock")], [], env)
        app = App(server, proxy_secret, uds=folder / "app.sock")
    else:
        port = free_port()
        app = App(Server(f"{name} app", [*command, "--host", "127.0.0.1", "--port", str(port)], [], env), proxy_secret, port=port)
    app.server.start(root / "output.log")

    def healthy() -> bool:
        try:
            return http_get("/healthz", port=app.port, uds=app.uds)[0] == 200
        except OSError:
            return False

    app.server.wait_until(healthy, "answer on /healthz")
    return app


# -- the terminators ------------------------------------------------------------------------------

def need_terminator(kind: str) -> str:
    """The server binary for `kind`, after checking that it and its modules are installed."""
    binary = find_binary({"apache": "apache2"}.get(kind, kind))
    need(binary, kind)
    if kind == "apache":
        need(Path("/usr/lib/apache2/modules/mod_ssl.so").exists(), "Apache's mod_ssl")
    if kind == "lighttpd":
        need(Path("/usr/lib/lighttpd/mod_openssl.so").exists(), "lighttpd's mod_openssl (package lighttpd-mod-openssl)")
        need(Path("/usr/lib/lighttpd/mod_magnet.so").exists(), "lighttpd's mod_magnet (package lighttpd-modules-lua)")
    return binary


def _terminator_root(lab_root: Path, name: str) -> Path:
    root = _readable_dir(lab_root / name)
    for sub in ("logs", "run", "tmp", "htdocs"):
        _readable_dir(root / sub)
    if running_as_root():
        # lighttpd opens its error log after dropping privileges; nginx writes its temp files as www-data
        for sub in ("logs", "tmp"):
            shutil.chown(root / sub, user=TERMINATOR_GROUP, group=TERMINATOR_GROUP)
    return root


def start_apache(
    name: str, lab_root: Path, tls_lab: TLSLab, backend: Backend, proxy_secret: str, *, old_devices: bool = False
) -> Started:
    binary = need_terminator("apache")
    root = _terminator_root(lab_root, name)
    port = free_port()
    sample = fill_in(_sample((DEPLOY / "apache" / "configserver.conf").read_text(), old_devices), {
        "Define CONFIGSERVER_ADDRESS": "127.0.0.1",
        "Define CONFIGSERVER_PORT": str(port),
        "Define CONFIGSERVER_NAME": "localhost",
        "Define CONFIGSERVER_CERT": str(tls_lab.server.cert),
        "Define CONFIGSERVER_KEY": str(tls_lab.server.key),
        "Define CONFIGSERVER_DEVICE_CAS": str(tls_lab.device_cas),
        "Define CONFIGSERVER_BACKEND": f"unix:{backend.uds}|http://localhost/",
        "Define CONFIGSERVER_PROXY_SECRET": proxy_secret,
    })
    config = write_secret_file(root / "configserver.conf", sample)
    (root / "apache2.conf").write_text(apache_main_conf(root, root / "configserver.conf"))
    # Debian's apache2ctl reads APACHE_LOG_DIR from /etc/apache2/envvars; the sample uses it.
    env = {**os.environ, "APACHE_LOG_DIR": str(root / "logs")}
    logs = [root / "logs" / "error.log", root / "logs" / "configserver-error.log"]
    command = [binary, "-d", str(root), "-f", str(root / "apache2.conf"), "-DFOREGROUND"]
    return Started(_start(Server(name, command, logs, env), root, port), port, config)


def start_nginx(
    name: str, lab_root: Path, tls_lab: TLSLab, backend: Backend, proxy_secret: str, *, old_devices: bool = False
) -> Started:
    binary = need_terminator("nginx")
    root = _terminator_root(lab_root, name)
    port = free_port()
    sample = fill_in(_sample((DEPLOY / "nginx" / "configserver.conf").read_text(), old_devices), {
        "server": f"unix:{backend.uds}" if backend.uds else f"127.0.0.1:{backend.port}",
        "listen": f"127.0.0.1:{port} ssl",
        "server_name": "localhost",
        "ssl_certificate": str(tls_lab.server.cert),
        "ssl_certificate_key": str(tls_lab.server.key),
        "ssl_client_certificate": str(tls_lab.device_cas),
        "proxy_set_header X-Configserver-Proxy-Secret": proxy_secret,
    })
    config = write_secret_file(root / "configserver.conf", sample)
    (root / "nginx.conf").write_text(nginx_main_conf(root, root / "configserver.conf"))
    logs = [root / "logs" / "error.log"]
    command = [binary, "-p", f"{root}/", "-c", str(root / "nginx.conf"), "-e", str(root / "logs" / "error.log")]
    return Started(_start(Server(name, command, logs), root, port), port, config)


def start_lighttpd(
    name: str, lab_root: Path, tls_lab: TLSLab, backend: Backend, proxy_secret: str, *, old_devices: bool = False
) -> Started:
    binary = need_terminator("lighttpd")
    root = _terminator_root(lab_root, name)
    port = free_port()
    lua = root / "configserver-client-cert.lua"
    shutil.copyfile(DEPLOY / "lighttpd" / "configserver-client-cert.lua", lua)
    lua.chmod(0o644)
    target = f'( "host" => "{backend.uds}" )' if backend.uds else f'( "host" => "127.0.0.1", "port" => {backend.port} )'
    sample = fill_in(_sample((DEPLOY / "lighttpd" / "50-configserver.conf").read_text(), old_devices), {
        "var.configserver_listen": f'"127.0.0.1:{port}"',
        "var.configserver_cert": f'"{tls_lab.server_chain}"',
        "var.configserver_key": f'"{tls_lab.server.key}"',
        "var.configserver_device_cas": f'"{tls_lab.device_cas}"',
        "var.configserver_lua": f'"{lua}"',
        "var.configserver_backend": target,
        "var.configserver_proxy_secret": f'"{proxy_secret}"',
    })
    config = write_secret_file(root / "50-configserver.conf", sample)
    (root / "lighttpd.conf").write_text(lighttpd_main_conf(root, root / "50-configserver.conf", free_port()))
    logs = [root / "logs" / "error.log"]
    return Started(_start(Server(name, [binary, "-D", "-f", str(root / "lighttpd.conf")], logs), root, port), port, config)


class Started(NamedTuple):
    server: Server
    port: int
    config: Path      # the filled-in sample, holding the proxy secret


def _sample(text: str, old_devices: bool) -> str:
    return enable_old_devices(text) if old_devices else text


def _start(server: Server, root: Path, port: int) -> Server:
    server.start(root / "output.log")
    try:
        server.wait_until(lambda: tcp_open(port), f"listener on 127.0.0.1:{port}")
    except BaseException:
        server.stop()
        raise
    return server


STARTERS = {"apache": start_apache, "nginx": start_nginx, "lighttpd": start_lighttpd}
# What a device without a valid certificate gets: a failed handshake, or nginx's own 400.
REFUSALS = {"apache": None, "nginx": 400, "lighttpd": None}
# Apache and lighttpd reach the app over its unix socket; nginx over loopback TCP, the samples'
# other choice, so that both kinds of backend are proven.
APP_ON_SOCKET = {"apache": True, "nginx": False, "lighttpd": True}


def _terminator_with_app(kind: str, lab_root: Path, site: Path, tls_lab: TLSLab, secret: str) -> Iterator[Terminator]:
    need_terminator(kind)
    app = start_app(kind, lab_root, site, tls_lab, secret, uds=APP_ON_SOCKET[kind])
    try:
        server, port, config = STARTERS[kind](kind, lab_root, tls_lab, app, secret)
        try:
            yield Terminator(kind, port, app, server, tls_lab, REFUSALS[kind], secret, config)
        finally:
            server.stop()
    finally:
        app.server.stop()


@pytest.fixture(scope="session")
def apache(lab_root: Path, terminator_site: Path, tls_lab: TLSLab, proxy_secret: str) -> Iterator[Terminator]:
    yield from _terminator_with_app("apache", lab_root, terminator_site, tls_lab, proxy_secret)


@pytest.fixture(scope="session")
def nginx(lab_root: Path, terminator_site: Path, tls_lab: TLSLab, proxy_secret: str) -> Iterator[Terminator]:
    yield from _terminator_with_app("nginx", lab_root, terminator_site, tls_lab, proxy_secret)


@pytest.fixture(scope="session")
def lighttpd(lab_root: Path, terminator_site: Path, tls_lab: TLSLab, proxy_secret: str) -> Iterator[Terminator]:
    yield from _terminator_with_app("lighttpd", lab_root, terminator_site, tls_lab, proxy_secret)


@pytest.fixture(scope="session", params=["apache", "nginx", "lighttpd"])
def terminator(request: pytest.FixtureRequest) -> Terminator:
    """Each terminator in turn, with the app behind it; the tests that take it run against all three."""
    return request.getfixturevalue(request.param)


def _terminator_with_echo(
    kind: str, lab_root: Path, tls_lab: TLSLab, secret: str, *, old_devices: bool, name: str | None = None
) -> Iterator[Terminator]:
    need_terminator(kind)
    name = name or f"{kind}-{'old-devices' if old_devices else 'echo'}"
    if APP_ON_SOCKET[kind]:
        folder = _readable_dir(lab_root / f"{name}-socket", 0o750)
        _give_to_terminator_group(folder)
        echo = EchoBackend.on_socket(folder / "echo.sock")
    else:
        echo = EchoBackend.on_port(free_port())
    try:
        server, port, config = STARTERS[kind](name, lab_root, tls_lab, echo, secret, old_devices=old_devices)
        try:
            yield Terminator(kind, port, echo, server, tls_lab, REFUSALS[kind], secret, config)
        finally:
            server.stop()
    finally:
        echo.close()


@pytest.fixture(scope="session", params=["apache", "nginx", "lighttpd"])
def echo_terminator(
    request: pytest.FixtureRequest, lab_root: Path, tls_lab: TLSLab, proxy_secret: str
) -> Iterator[Terminator]:
    """Each terminator in turn, with a backend that answers every request with its head as received:
    what exactly the app would be told."""
    yield from _terminator_with_echo(request.param, lab_root, tls_lab, proxy_secret, old_devices=False)


@pytest.fixture(scope="session", params=["apache", "nginx", "lighttpd"])
def old_devices_terminator(
    request: pytest.FixtureRequest, lab_root: Path, tls_lab: TLSLab, proxy_secret: str
) -> Iterator[Terminator]:
    """Each terminator in turn with its sample's settings for old devices switched on, in front of
    the echo backend."""
    yield from _terminator_with_echo(request.param, lab_root, tls_lab, proxy_secret, old_devices=True)


@pytest.fixture
def fresh_terminator(lab_root: Path, tls_lab: TLSLab) -> Iterator[Callable[[str], Terminator]]:
    """Starts a terminator of the kind asked for, in front of the echo backend, with a secret of its
    own: a test may reload, stop or restart it. Stopped when the test ends."""
    with contextlib.ExitStack() as stack:
        def start(kind: str) -> Terminator:
            name = f"{kind}-fresh-{next(_fresh)}"
            running = _terminator_with_echo(kind, lab_root, tls_lab, new_proxy_secret(), old_devices=False, name=name)
            stack.callback(running.close)
            return next(running)
        yield start


_fresh = itertools.count(1)
