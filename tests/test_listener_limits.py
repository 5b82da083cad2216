"""Both listeners under clients that send too little or too much: real sockets on loopback.

The built-in TLS listener and the plain one a terminator talks to run under the same limits
(configserver/limits.py): a handshake, a request head and an idle keep-alive connection each get
a short time, a request head a size, and a worker a number of connections. Each test holds a
connection the way an attacker would and watches the server end it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ports import free_port
from test_tls import EchoApp, Files, LabPKI, device_context, get, listening

from configserver.limits import Connections, head_size

SHORT = dict(tls_handshake_timeout=0.5, request_head_timeout=0.5, keep_alive_timeout=0.3)
LIMIT = 8192  # max_request_head_bytes in these tests
# How long a test waits for the server to end a connection: the timeouts above, and room to spare.
PATIENCE = 5.0

by_protocol = pytest.mark.parametrize("protocol", ["h11", "httptools"])
by_listener = pytest.mark.parametrize("tls", [True, False], ids=["built-in TLS", "header path"])


@pytest.fixture(scope="module")
def files(pki: LabPKI, tmp_path_factory: pytest.TempPathFactory) -> Files:
    return Files(tmp_path_factory.mktemp("limits"), pki)


@contextlib.contextmanager
def serving(files: Files, protocol: str = "httptools", tls: bool = True, **limits: Any) -> Iterator[tuple[int, EchoApp]]:
    app = EchoApp()
    values = {**SHORT, "max_request_head_bytes": LIMIT, **limits}
    with listening(app, **files.listener(protocol, tls=tls, **values)) as port:
        yield port, app


def ended_by_server(sock: socket.socket) -> float:
    """Wait for the server to end the connection; returns the seconds it took. Fails after PATIENCE."""
    start = time.monotonic()
    sock.settimeout(PATIENCE)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionError, ssl.SSLError):
        pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {PATIENCE} s")
    return time.monotonic() - start


def tls_connection(files: Files, pki: LabPKI, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=PATIENCE)
    return device_context(files, pki.phone).wrap_socket(raw, server_hostname="127.0.0.1")


def connect(files: Files, pki: LabPKI, port: int, tls: bool) -> socket.socket:
    if tls:
        return tls_connection(files, pki, port)
    return socket.create_connection(("127.0.0.1", port), timeout=PATIENCE)


def answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes."""
    sock.settimeout(PATIENCE)
    data = b""
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


# -- time ------------------------------------------------------------------------------------------


def test_a_connection_that_never_starts_the_handshake_is_closed(files: Files) -> None:
    with serving(files) as (port, _), socket.create_connection(("127.0.0.1", port)) as idle:
        assert ended_by_server(idle) < PATIENCE


def test_a_handshake_left_half_way_is_closed(files: Files) -> None:
    # a ClientHello, then nothing: the server's answer is never acknowledged
    hello = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = hello.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    with serving(files) as (port, _), socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(outgoing.read())
        assert ended_by_server(sock) < PATIENCE


@by_listener
@by_protocol
def test_a_connection_that_sends_nothing_after_connecting_is_closed(files: Files, pki: LabPKI, protocol: str,
                                                                   tls: bool) -> None:
    with serving(files, protocol, tls) as (port, app), connect(files, pki, port, tls) as sock:
        assert ended_by_server(sock) < PATIENCE
    assert app.requests == 0


@by_listener
@by_protocol
def test_a_connection_that_sends_half_a_request_head_is_closed(files: Files, pki: LabPKI, protocol: str,
                                                              tls: bool) -> None:
    with serving(files, protocol, tls) as (port, app), connect(files, pki, port, tls) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        for _ in range(3):  # a byte now and then does not keep it alive
            time.sleep(0.2)
            with contextlib.suppress(OSError):
                sock.sendall(b"a")
        assert ended_by_server(sock) < PATIENCE
    assert app.requests == 0


@by_protocol
def test_an_idle_keep_alive_connection_is_closed_after_its_answer(files: Files, pki: LabPKI, protocol: str) -> None:
    with serving(files, protocol) as (port, app), tls_connection(files, pki, port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        assert ended_by_server(sock) < PATIENCE
    assert app.requests == 1


@by_protocol
def test_a_slow_second_request_head_is_closed_too(files: Files, pki: LabPKI, protocol: str) -> None:
    with serving(files, protocol) as (port, app), tls_connection(files, pki, port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET / HTTP/1.1\r\n")
        for _ in range(4):  # each byte would restart uvicorn's keep-alive timer
            time.sleep(0.2)
            with contextlib.suppress(OSError):
                sock.sendall(b"X")
        assert ended_by_server(sock) < PATIENCE
    assert app.requests == 1


# -- size ------------------------------------------------------------------------------------------


def head(total: int, *, complete: bool) -> bytes:
    """A GET whose head is `total` bytes long, or that long and not yet finished."""
    start = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Filler: "
    end = b"\r\n\r\n" if complete else b""
    return start + b"a" * (total - len(start) - len(end)) + end


@by_listener
@by_protocol
def test_a_request_head_over_the_limit_is_answered_431_before_it_ends(files: Files, pki: LabPKI, protocol: str,
                                                                     tls: bool) -> None:
    with serving(files, protocol, tls) as (port, app), connect(files, pki, port, tls) as sock:
        sock.sendall(head(LIMIT + 1024, complete=False))
        reply = answer(sock)
    assert reply.startswith(b"HTTP/1.1 431 ")
    assert reply.endswith(b"\r\n\r\n# request header too large\n")
    assert app.requests == 0


@by_listener
@by_protocol
def test_a_whole_request_head_over_the_limit_is_answered_431(files: Files, pki: LabPKI, protocol: str,
                                                            tls: bool) -> None:
    with serving(files, protocol, tls) as (port, app), connect(files, pki, port, tls) as sock:
        sock.sendall(head(LIMIT + 1024, complete=True))
        reply = answer(sock)
    assert reply.startswith(b"HTTP/1.1 431 ")
    assert reply.endswith(b"\r\n\r\n# request header too large\n")
    assert app.requests == 0


@by_listener
@by_protocol
def test_a_request_head_under_the_limit_is_served(files: Files, pki: LabPKI, protocol: str, tls: bool) -> None:
    with serving(files, protocol, tls) as (port, app), connect(files, pki, port, tls) as sock:
        sock.sendall(head(LIMIT - 512, complete=True))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert app.requests == 1


def test_a_flood_of_header_bytes_is_cut_off_early(files: Files) -> None:
    # 20 MB of one header line: the server answers and closes long before the end
    with serving(files, tls=False) as (port, app), socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(PATIENCE)
        sent = 0
        with contextlib.suppress(ConnectionError):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Flood: ")
            while sent < 20_000_000:
                sent += sock.send(b"a" * 65536)
        assert sent < 20_000_000
    assert app.requests == 0


def test_head_size_counts_the_request_line_and_every_header() -> None:
    scope = {"method": "GET", "raw_path": b"/update", "query_string": b"ver=1",
             "headers": [(b"host", b"config.example.com"), (b"x-ssl-client-verify", b"SUCCESS")]}
    wire = b"GET /update?ver=1 HTTP/1.1\r\nhost: config.example.com\r\nx-ssl-client-verify: SUCCESS\r\n\r\n"
    assert abs(head_size(scope) - len(wire)) <= 4


# -- number ----------------------------------------------------------------------------------------


def test_at_the_cap_the_connection_idle_longest_makes_room() -> None:
    connections = Connections(3)
    assert [connections.admit(name) for name in ("a", "b", "c")] == [None, None, None]
    connections.busy("a")  # a request under way is never dropped
    assert connections.admit("d") == "b"
    connections.busy("c")
    connections.idle("a")  # answered: now the youngest idle one
    assert connections.admit("e") == "d"
    connections.busy("a")
    connections.busy("e")
    assert connections.admit("f") == "f"  # all busy: the newcomer waits its turn elsewhere
    assert len(connections) == 3


def test_more_idle_connections_than_the_cap_cost_no_device_its_script(files: Files, pki: LabPKI) -> None:
    with serving(files, max_connections=20, tls_handshake_timeout=30) as (port, app):
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(60)]
        try:
            [(status, _)] = get(port, device_context(files, pki.phone))
        finally:
            for sock in idle:
                sock.close()
    assert status == 200 and app.requests == 1


# -- the case: a real `serve` under a 256-file limit ---------------------------------------


def _limit_open_files() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def test_400_idle_sockets_do_not_lock_a_device_out_under_a_256_file_limit(files: Files, pki: LabPKI,
                                                                          tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "default.j2").write_text("# script for {{ device.hwid }}\n")
    config = tmp_path / "configserver.toml"
    config.write_text(
        f'templates = "{tmp_path / "templates"}"\nvars = "{tmp_path / "vars"}"\nca_bundle = "{files.bundle}"\n'
        f'tls_cert = "{files.server_cert}"\ntls_key = "{files.server_key}"\ngrace_seconds = 0\n'
        f'database = "sqlite:///{tmp_path / "inventory.db"}"\nmax_connections = 100\napply_once = false\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIGSERVER_")}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "configserver", "--config", str(config), "serve", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, preexec_fn=_limit_open_files,
        )
    idle: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                [(status, _)] = get(port, device_context(files, pki.phone))
                break
            except (ConnectionError, ssl.SSLError, OSError):
                time.sleep(0.2)
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(400)]
        answers = get(port, device_context(files, pki.phone), requests=1)
    finally:
        for sock in idle:
            sock.close()
        server.terminate()
        server.wait(15)
    assert answers == [(200, b"# script for IP232-30-00-af\r\n")], log.read_text()


@pytest.mark.parametrize("protocol", ["h11", "httptools"])
def test_a_websocket_upgrade_is_an_ordinary_request(files: Files, pki: LabPKI, protocol: str) -> None:
    # an upgraded connection would leave the limits behind; the service has no WebSockets
    from configserver import load_settings
    from configserver.tls import uvicorn_options

    app = EchoApp()
    with listening(app, **uvicorn_options(load_settings(), http=protocol)) as port, \
            socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                     b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200 ") and app.requests == 1
