"""An answer leaves in one write: its head is held until its body follows, on both protocols."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from test_listener_limits import PATIENCE, SHORT, by_protocol, files, tls_connection  # noqa: F401  (the fixture)
from test_tls import Files, LabPKI, listening

from configserver import limits
from configserver.limits import Connections, OneWrite


class Recording:
    """A transport that keeps every write it is given."""

    def __init__(self, transport: Any = None) -> None:
        self.transport = transport
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def is_closing(self) -> bool:
        return self.closed if self.transport is None else self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def test_a_held_head_leaves_with_the_body_that_follows() -> None:
    wire = Recording()
    writer = OneWrite(wire)  # type: ignore[arg-type]
    writer.hold_next()
    writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert wire.writes == []
    writer.write(b"body")
    writer.flush()
    assert wire.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]


def test_a_head_without_a_body_leaves_when_its_message_is_done_or_the_connection_closes() -> None:
    wire = Recording()
    writer = OneWrite(wire)  # type: ignore[arg-type]
    writer.hold_next()
    writer.write(b"HEAD answer")
    writer.flush()                       # HEAD: uvicorn writes no body
    writer.hold_next()
    writer.write(b"head of a failing app")
    writer.close()                       # the app failed after its head: uvicorn closes
    assert wire.writes == [b"HEAD answer", b"head of a failing app"] and wire.closed


def test_a_write_nobody_asked_to_hold_goes_straight_through() -> None:
    wire = Recording()
    writer = OneWrite(wire)  # type: ignore[arg-type]
    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    writer.hold_next()
    writer.hold_next(False)              # uvicorn refused the head before writing it
    writer.write(b"next")
    assert wire.writes == [b"HTTP/1.1 100 Continue\r\n\r\n", b"next"]


class Answers:
    """GET: a whole answer; /stream: an answer in three parts; HEAD: the head alone."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            for part in (b"one ", b"two ", b"three\n"):
                await send({"type": "http.response.body", "body": part, "more_body": part != b"three\n"})
            return
        body = b"# the script\n"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})


def received(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("the server closed the connection before the whole answer")
    return chunk


def read_answer(sock: socket.socket, *, head_only: bool = False) -> bytes:
    """One answer (the tests using it ask for the next one only once they have read it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += received(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    if head_only:
        return head + b"\r\n\r\n"
    if b"chunked" in head.lower():
        while not body.endswith(b"0\r\n\r\n"):
            body += received(sock)
    else:
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += received(sock)
    return head + b"\r\n\r\n" + body


def spy_on_writes(monkeypatch: pytest.MonkeyPatch) -> list[Recording]:
    """The writes each connection's one-write transport passes on, a list per connection."""
    wires: list[Recording] = []

    class Spied(OneWrite):
        def __init__(self, transport: Any) -> None:
            wires.append(Recording(transport))
            super().__init__(wires[-1])  # type: ignore[arg-type]

    monkeypatch.setattr(limits, "OneWrite", Spied)
    return wires


@by_protocol
@pytest.mark.parametrize("tls", [False, True], ids=["header path", "built-in TLS"])
def test_each_answer_on_a_keep_alive_connection_is_one_write(
    files: Files, pki: LabPKI, protocol: str, tls: bool, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    wires = spy_on_writes(monkeypatch)
    with listening(Answers(), **files.listener(protocol, tls=tls, **SHORT, max_request_head_bytes=8192)) as port:
        connection = tls_connection(files, pki, port) if tls else socket.create_connection(("127.0.0.1", port),
                                                                                        timeout=PATIENCE)
        with connection as sock:
            answers = []
            for request in (b"GET /init", b"HEAD /init", b"GET /stream", b"GET /init"):
                sock.sendall(request + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                answers.append(read_answer(sock, head_only=request.startswith(b"HEAD")))
    [wire] = wires
    get, head, stream, again = answers
    assert get.startswith(b"HTTP/1.1 200 ") and get.endswith(b"\r\n\r\n# the script\n") and again == get
    assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: 13" in head.lower()
    assert stream.endswith(b"4\r\none \r\n4\r\ntwo \r\n6\r\nthree\n\r\n0\r\n\r\n")
    # the two whole answers and the HEAD: one write each; the streamed one: its head with its first part
    assert wire.writes[0] == get and wire.writes[1] == head and wire.writes[-1] == again
    assert wire.writes[2].endswith(b"\r\n\r\n4\r\none \r\n") and b"".join(wire.writes[2:-1]) == stream


@by_protocol
def test_pipelined_requests_are_answered_in_order_one_write_each(
    files: Files, protocol: str, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    wires = spy_on_writes(monkeypatch)
    with listening(Answers(), **files.listener(protocol, tls=False, **SHORT, max_request_head_bytes=8192)) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as sock:
            sock.sendall(b"GET /init HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 3)   # three requests in one go
            data = b""
            while data.count(b"# the script\n") < 3:
                data += received(sock)
    [wire] = wires
    answers = [answer + b"# the script\n" for answer in data.split(b"# the script\n")[:3]]
    assert all(answer.startswith(b"HTTP/1.1 200 ") for answer in answers) and b"".join(answers) == data
    assert wire.writes == answers   # each answer one write, in the order asked


def test_a_connection_waiting_for_its_head_counts_from_when_it_began_to_wait() -> None:
    now = [100.0]
    connections = Connections(10, clock=lambda: now[0])
    connections.admit("a")
    now[0] = 101.0
    connections.admit("b")
    connections.busy("a")
    now[0] = 102.0
    connections.idle("a")   # answered at 102: waits for its next head from then on
    now[0] = 111.5
    assert connections.idle_longer_than(10) == ["b"]
    now[0] = 112.5
    assert connections.idle_longer_than(10) == ["b", "a"]
