"""Running the real TLS terminators from the deploy/ samples, and polling them as a device would.

Each server runs in the foreground from its own main config file (what Debian's apache2.conf,
nginx.conf or lighttpd.conf would be), which includes the sample from deploy/ filled in for
paths, ports and the proxy secret only, exactly as an admin edits the marked block at its top,
and kept as the samples say: readable by root only (by its owner when the tests do not run as root).
"""

from __future__ import annotations

import http.client
import os
import re
import secrets
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from configserver.lab.pki import IssuedCert

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

BEGIN_VALUES = "==== values to change"
END_VALUES = "==== end of values to change"


# The device every refused certificate claims to be: if one got through, its script would show.
VICTIM = "IP232-30-00-af"

# What each terminator sets on every request it forwards, and the app requires (`proxy_secret`).
PROXY_SECRET_HEADER = "X-Configserver-Proxy-Secret"


def new_proxy_secret() -> str:
    """A proxy secret as the samples say to make one: `openssl rand -hex 32`."""
    return secrets.token_hex(32)


def write_secret_file(path: Path, text: str) -> Path:
    """Write a config file that holds the proxy secret: mode 0600, never readable by others, not
    even for an instant (the file is created with that mode)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    path.chmod(0o600)  # whatever the umask
    return path


class SampleError(AssertionError):
    """A sample could not be filled in the way an admin would."""


def fill_in(sample: str, values: Mapping[str, str]) -> str:
    """The sample with the marked values replaced, and nothing else touched.

    `values` maps the start of a line inside the marked block (`Define CONFIGSERVER_PORT`,
    `listen`, `var.configserver_cert`, `templates`) to its new value, written in the file's
    own syntax. A line keeps its indentation, its `=` and its trailing `;`. Every key must match
    exactly one line of the block.
    """
    lines = sample.splitlines(keepends=True)
    begin = [i for i, line in enumerate(lines) if BEGIN_VALUES in line]
    end = [i for i, line in enumerate(lines) if END_VALUES in line]
    if len(begin) != 1 or len(end) != 1 or not begin[0] < end[0]:
        raise SampleError("the sample needs exactly one marked block of values to change")
    matched = {key: 0 for key in values}
    for i in range(begin[0] + 1, end[0]):
        line = lines[i]
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith("{"):
            continue
        for key, value in values.items():
            m = re.match(rf"^(\s*){re.escape(key)}(\s*=\s*|\s+)(.*?)(;?)\s*$", line.rstrip("\n"))
            if m:
                indent, separator, _, semicolon = m.groups()
                lines[i] = f"{indent}{key}{separator}{value}{semicolon}\n"
                matched[key] += 1
    wrong = {key: n for key, n in matched.items() if n != 1}
    if wrong:
        raise SampleError(f"each value must match one line of the marked block: {wrong}")
    return "".join(lines)


def enable_old_devices(sample: str) -> str:
    """The sample as an admin edits it after its "Old devices" comment: the directives quoted there
    (indented lines inside that comment) become active, replacing active ones of the same name."""
    lines = sample.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("# Old devices."))
    quoted: dict[int, str] = {}
    for i in range(start, len(lines)):
        if not lines[i].strip().startswith("#"):
            break
        m = re.match(r"^(\s*)#\s{5}(\S.*)$", lines[i])
        if m:
            quoted[i] = f"{m.group(1)}{m.group(2)}\n"
    if not quoted:
        raise SampleError("the Old devices comment quotes no directive")
    names = {text.split()[0] for text in quoted.values()}
    out = []
    for i, line in enumerate(lines):
        if i in quoted:
            out.append(quoted[i])
        elif not line.strip().startswith("#") and line.split()[:1] and line.split()[0] in names:
            continue  # the directive the quoted lines replace
        else:
            out.append(line)
    return "".join(out)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def running_as_root() -> bool:
    return os.geteuid() == 0


def find_binary(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name) if os.access(p, os.X_OK)), None
    )


@dataclass
class Server:
    """A foreground server process with its own log files; stopped by `stop()`."""

    name: str
    command: Sequence[str]
    logs: Sequence[Path]
    env: Mapping[str, str] | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    output: Path | None = None

    def start(self, output: Path) -> "Server":
        self.output = output
        with open(output, "wb") as out:
            self.process = subprocess.Popen(
                list(self.command), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=dict(self.env) if self.env is not None else None, start_new_session=True,
            )
        return self

    def wait_until(self, ready, what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} before {what}\n{self.tail()}")
            if ready():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: no {what} within {timeout:g} s\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        parts = []
        for path in [self.output, *self.logs]:
            if path is not None and path.exists():
                parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def tcp_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(path: str, *, port: int | None = None, uds: Path | None = None, source: str | None = None,
             headers: Iterable[tuple[str, str]] = ()) -> tuple[int, bytes]:
    """A plain-HTTP GET straight to the app, over TCP or its unix socket."""
    if uds is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(str(uds))
    else:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0) if source else None)
    with sock:
        head = f"GET {path} HTTP/1.1\r\nHost: configserver\r\nConnection: close\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers)
        sock.sendall((head + "\r\n").encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    _, _, body = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), body


@dataclass(frozen=True)
class Outcome:
    """What a device got: an HTTP answer, or none at all (`status` None: the handshake failed)."""

    status: int | None
    body: str = ""
    error: str = ""

    @property
    def lines(self) -> list[str]:
        return self.body.split("\r\n")


def poll(
    port: int,
    *,
    server_ca: Path,
    cert: Path | None = None,
    key: Path | None = None,
    path: str = "/update",
    headers: Iterable[tuple[str, str]] = (),
    tls_version: ssl.TLSVersion | None = None,
    legacy: bool = False,
    source: str = "127.0.0.3",
) -> Outcome:
    """GET `path` from a terminator on 127.0.0.1:`port` over TLS, showing `cert` if given.

    The server must prove itself with a certificate from `server_ca`, as a device checks its
    trust list. `headers` go out exactly as given, duplicates and letter case included. The
    device connects from `source`, another loopback address than the terminator's own, so its
    address is told apart from the terminator's. `legacy` lets the client itself accept
    anything (security level 0), so that only the server decides.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(server_ca)
    if legacy:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    if tls_version is not None:
        with warnings.catch_warnings():  # TLS 1.0 and 1.1 are deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = context.maximum_version = tls_version
    if cert is not None:
        context.load_cert_chain(cert, key)
    connection = http.client.HTTPSConnection(
        "127.0.0.1", port, context=context, timeout=10, source_address=(source, 0)
    )
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.putheader("User-Agent", "innovaphone-IP232/13r3")
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        body = response.read().decode("utf-8", errors="replace")
        return Outcome(response.status, body)
    except ssl.SSLCertVerificationError:
        raise  # the lab's own server certificate did not verify: a broken test, not a refusal
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as exc:
        return Outcome(None, error=f"{type(exc).__name__}: {exc}")
    finally:
        connection.close()


# -- the main config files, standing in for Debian's own ----------------------------------------

def apache_main_conf(root: Path, site: Path) -> str:
    """What /etc/apache2/apache2.conf provides on Debian, reduced to this one site."""
    modules = "/usr/lib/apache2/modules"
    user = "User www-data\nGroup www-data\n" if running_as_root() else ""
    loads = "".join(
        f"LoadModule {name}_module {modules}/mod_{name}.so\n"
        for name in (
            # enabled on every Debian install
            "mpm_event", "authn_core", "authz_core", "authz_host", "reqtimeout",
            # what the sample asks for: a2enmod ssl proxy_http headers
            "socache_shmcb", "ssl", "proxy", "proxy_http", "headers",
        )
    )
    return (
        f'ServerRoot "{root}"\n'
        f'DefaultRuntimeDir "{root}/run"\n'
        f'PidFile "{root}/apache2.pid"\n'
        f"Mutex file:{root}/run default\n"
        f'ErrorLog "{root}/logs/error.log"\n'
        "LogLevel warn\n"
        f"{loads}{user}"
        "ServerName localhost\n"
        f"SSLSessionCache shmcb:{root}/run/ssl_scache(512000)\n"
        f'Include "{site}"\n'
    )


def nginx_main_conf(root: Path, site: Path) -> str:
    """What /etc/nginx/nginx.conf provides on Debian, TLS defaults included, for this one site."""
    user = "user www-data;\n" if running_as_root() else ""
    temp = "".join(f"    {kind}_temp_path {root}/tmp/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (
        f"{user}pid {root}/nginx.pid;\n"
        f"error_log {root}/logs/error.log info;\n"
        "worker_processes 1;\n"
        "daemon off;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        "    ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3;   # as in Debian's nginx.conf\n"
        "    ssl_prefer_server_ciphers on;\n"
        f"    access_log {root}/logs/access.log;\n"
        f"{temp}"
        f"    include {site};\n"
        "}\n"
    )


def lighttpd_main_conf(root: Path, site: Path, plain_port: int) -> str:
    """What /etc/lighttpd/lighttpd.conf provides on Debian: a plain default site, and the include."""
    user = 'server.username = "www-data"\nserver.groupname = "www-data"\n' if running_as_root() else ""
    return (
        f'server.document-root = "{root}/htdocs"\n'
        'server.bind = "127.0.0.1"\n'
        f"server.port = {plain_port}\n"
        f'server.errorlog = "{root}/logs/error.log"\n'
        f'server.pid-file = "{root}/lighttpd.pid"\n'
        f"{user}"
        'server.modules = ( "mod_access" )\n'
        f'include "{site}"\n'
    )


# -- what the fixtures hand to the tests ---------------------------------------------------------

@dataclass(frozen=True)
class Credential:
    """A lab certificate and its key, on disk."""

    issued: IssuedCert
    cert: Path
    key: Path


@dataclass(frozen=True)
class TLSLab:
    device_cas: Path          # CA 1 + CA 2: the bundle every terminator and the app are given
    server_ca: Path           # what a device's trust list holds for our server
    server: Credential        # the terminators' own certificate (127.0.0.1, localhost)
    server_chain: Path        # the same followed by its CA, for lighttpd
    devices: dict[str, Credential]


@dataclass
class App:
    """`configserver serve` with the production settings sample, on a unix socket or a TCP port."""

    server: Server
    proxy_secret: str
    uds: Path | None = None
    port: int | None = None


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            data += chunk
        head = data.split(b"\r\n\r\n", 1)[0] + b"\r\n"
        self.request.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(head), head)
        )


class _UnixEchoServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _TCPEchoServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


class EchoBackend:
    """Stands in for the app: answers every request with the request head, byte for byte as the
    terminator sent it, so a test sees exactly which headers would reach the app."""

    def __init__(self, server: socketserver.BaseServer, uds: Path | None, port: int | None) -> None:
        self._server = server
        self.uds, self.port = uds, port
        threading.Thread(target=server.serve_forever, args=(0.05,), name="echo backend", daemon=True).start()

    @classmethod
    def on_socket(cls, path: Path) -> "EchoBackend":
        server = _UnixEchoServer(str(path), _EchoHandler)
        path.chmod(0o666)  # as uvicorn does: the folder decides who gets in
        return cls(server, path, None)

    @classmethod
    def on_port(cls, port: int) -> "EchoBackend":
        return cls(_TCPEchoServer(("127.0.0.1", port), _EchoHandler), None, port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


Backend = App | EchoBackend


@dataclass
class Terminator:
    """A TLS terminator from deploy/, what is behind it (the app), and how it refuses a device.

    `refusal` is what a device without a valid certificate gets: None for a failed handshake
    (Apache, lighttpd), or nginx's own HTTP status 400.
    """

    name: str
    port: int
    backend: Backend
    server: Server
    lab: TLSLab
    refusal: int | None
    proxy_secret: str            # filled into the sample; the app (if that is the backend) has it too
    config: Path                 # the filled-in sample, the file that holds the proxy secret

    def poll(self, device: str | None = None, **options) -> Outcome:
        """Poll as `device` (a key of TLSLab.devices), or without a client certificate."""
        credential = self.lab.devices[device] if device else None
        return poll(
            self.port,
            server_ca=self.lab.server_ca,
            cert=credential.cert if credential else None,
            key=credential.key if credential else None,
            **options,
        )


