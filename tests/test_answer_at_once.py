"""Answers given at once (limits.AnsweredAtOnce): the httptools listener writes what its app
answers to a request head without uvicorn's request cycle, task and ASGI messages. Real sockets on
loopback: byte for byte what the ASGI way writes, in order with the requests answered that way,
under the same limits."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import json
import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from test_listener_limits import (
    LIMIT,
    PATIENCE,
    SHORT,
    answer,
    by_listener,
    connect,
    ended_by_server,
    files,  # noqa: F401  (the fixture)
    head,
)
from test_one_write import read_answer
from test_tls import Files, LabPKI, listening

from configserver.limits import AnsweredAtOnce


BIG = 16 << 20     # an answer larger than the socket's buffers: its writing pauses
SLOW = 1.0         # an ASGI answer that takes longer than the keep-alive timeout (SHORT)


class Answers:
    """Answers every request with what it saw, at once unless `at_once` is off or the path starts
    with /asgi. /fail: answering at once fails; /fail-after: what follows the answer fails."""

    def __init__(self) -> None:
        self.at_once = True
        self.answered_at_once = 0
        self.finished = 0
        self.asgi = 0

    @staticmethod
    def answer(scope: dict[str, Any]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        seen = {"path": scope["path"], "query": scope["query_string"].decode(), "method": scope["method"],
                "tls": "tls" in scope.get("extensions", {})}
        if scope["path"] == "/big":
            seen["filler"] = "x" * BIG
        body = json.dumps(seen).encode()
        return 200, [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))], body

    def answer_at_once(self, scope: dict[str, Any]) -> AnsweredAtOnce | None:
        if not self.at_once or scope["path"].startswith("/asgi"):
            return None
        if scope["path"] == "/fail":
            raise RuntimeError("the app failed to answer at once")
        self.answered_at_once += 1
        status, headers, body = self.answer(scope)
        if scope["path"] == "/no-such-status":
            status = 1000
        return AnsweredAtOnce(status, headers, body, self._fail if scope["path"] == "/fail-after" else self._finish)

    def _finish(self) -> None:
        self.finished += 1

    def _fail(self) -> None:
        raise RuntimeError("the app failed after its answer")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.asgi += 1
        if scope["path"] == "/asgi-slow":
            await asyncio.sleep(SLOW)
        status, headers, body = self.answer(scope)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def serving(files: Files, tls: bool = True, **limits: Any) -> Iterator[tuple[int, Answers]]:
    app = Answers()
    with listening(app, **files.listener("httptools", tls=tls, **{**SHORT, "max_request_head_bytes": LIMIT,
                                                                    **limits})) as port:
        yield port, app


def get(path: str, *, method: str = "GET", version: str = "1.1", extra: bytes = b"") -> bytes:
    return f"{method} {path} HTTP/{version}\r\nHost: 127.0.0.1\r\n".encode() + extra + b"\r\n"


def seen(answer: bytes) -> dict[str, Any]:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


def undated(answer: bytes) -> bytes:
    return re.sub(rb"date: [^\r]*\r\n", b"", answer)


@by_listener
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("connection", ["keep-alive", "close"])
def test_an_answer_given_at_once_is_the_answer_the_asgi_way_writes(files: Files, pki: LabPKI, tls: bool,
                                                                  method: str, connection: str) -> None:
    replies = []
    request = get("/init?mac=00-90-33-30-00-af", method=method, extra=f"connection: {connection}\r\n".encode())
    # long timeouts: only the answer's end closes the connection
    with serving(files, tls, keep_alive_timeout=30, request_head_timeout=30) as (port, app):
        for at_once in (True, False):
            app.at_once = at_once
            with connect(files, pki, port, tls) as sock:
                if connection == "keep-alive":   # what follows the answer is the next answer
                    sock.sendall(request + get("/asgi", method=method, extra=b"connection: close\r\n"))
                else:
                    sock.sendall(request)
                replies.append(answer(sock))
    assert app.answered_at_once == app.finished == 1 and app.asgi == (3 if connection == "keep-alive" else 1)
    assert undated(replies[0]) == undated(replies[1])
    assert b"date: " in replies[0]
    if method == "GET":
        first = replies[0].split(b"HTTP/1.1 ")[1]
        assert seen(first) == {"path": "/init", "query": "mac=00-90-33-30-00-af", "method": "GET", "tls": tls}
    else:
        assert all(reply.endswith(b"\r\n\r\n") for reply in replies[0].split(b"HTTP/1.1 ")[1:])


def test_requests_sent_together_are_answered_in_order_the_first_at_once(files: Files, pki: LabPKI) -> None:
    with serving(files) as (port, app), connect(files, pki, port, True) as sock:
        sock.sendall(get("/one") + get("/asgi-two") + get("/three") + get("/four", method="HEAD") + get("/five"))
        reader = Reader(sock)
        answers = [reader.next(head_only=n == 3) for n in range(5)]
        sock.sendall(get("/six"))
        answers.append(reader.next())
    assert [seen(answer)["path"] for n, answer in enumerate(answers) if n != 3] == \
        ["/one", "/asgi-two", "/three", "/five", "/six"]
    assert answers[3].startswith(b"HTTP/1.1 200 OK\r\n") and answers[3].endswith(b"\r\n\r\n")
    # one request a read is answered at once: the rest of a pipeline each in its turn
    assert app.answered_at_once == app.finished == 2 and app.asgi == 4


def answered(files: Files, *writes: bytes, pause: float = 0.0, **limits: Any) -> tuple[list[str], Answers]:
    """The paths answered, in order, to `writes` sent on one plain connection, each in one write
    followed by `pause` seconds; and the app, for what it counted."""
    with serving(files, tls=False, **limits) as (port, app), \
            socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as sock:
        for data in writes:
            sock.sendall(data)
            time.sleep(pause)
        reader = Reader(sock)
        paths = [seen(reader.next())["path"] for data in writes for _ in range(data.count(b" HTTP/1.1\r\n"))]
    return paths, app


def test_of_two_requests_in_one_read_only_the_first_is_answered_at_once(files: Files) -> None:
    paths, app = answered(files, get("/first") + get("/second"))
    assert paths == ["/first", "/second"] and app.answered_at_once == 1 and app.asgi == 1


def test_a_long_pipeline_is_answered_whole_and_in_order(files: Files) -> None:
    sent = ["/asgi-first", *(f"/poll-{n}" for n in range(400))]
    paths, app = answered(files, b"".join(get(path) for path in sent))
    assert paths == sent
    assert app.answered_at_once == app.finished and app.answered_at_once + app.asgi == len(sent)


def test_a_head_answered_the_asgi_way_leaves_before_the_answer_after_it(files: Files, pki: LabPKI) -> None:
    # a HEAD answer is a head alone, held until its message ends
    with serving(files, tls=False) as (port, app), connect(files, pki, port, False) as sock:
        sock.sendall(get("/asgi-head", method="HEAD") + get("/after"))
        reader = Reader(sock)
        head = reader.next(head_only=True)
        after = reader.next()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: " in head
    assert seen(after)["path"] == "/after"


def test_a_request_that_waited_its_turn_is_answered_the_asgi_way(files: Files) -> None:
    # answered when the one before it ends, inside that one's end: never at once there
    paths, app = answered(files, get("/asgi-slow"), get("/waited"), pause=0.3)
    assert paths == ["/asgi-slow", "/waited"] and app.answered_at_once == 0 and app.asgi == 2


def test_an_answer_given_at_once_does_not_end_a_slow_one_after_it(files: Files) -> None:
    # the first answer arms the keep-alive timer; the next request of the same read outlasts it
    paths, app = answered(files, get("/first") + get("/asgi-slow"))
    assert paths == ["/first", "/asgi-slow"] and app.answered_at_once == 1 and app.asgi == 1


def test_an_answer_that_cannot_leave_at_once_waits_its_turn_the_asgi_way(files: Files) -> None:
    # not read for a while: the first answer fills the socket, and the server's writing pauses
    paths, app = answered(files, get("/big"), get("/after"), pause=0.5, keep_alive_timeout=30)
    assert paths == ["/big", "/after"] and app.answered_at_once == 1 and app.asgi == 1


class Reader:
    """The answers on one connection, one at a time, however they arrive."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(PATIENCE)
        self.sock, self.data = sock, b""

    def _more(self) -> None:
        chunk = self.sock.recv(1 << 20)
        assert chunk, f"the server closed the connection; unread: {self.data[:200]!r}"
        self.data += chunk

    def next(self, *, head_only: bool = False) -> bytes:
        while b"\r\n\r\n" not in self.data:
            self._more()
        end = self.data.index(b"\r\n\r\n") + 4
        if not head_only:
            end += int(self.data[:end].lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(self.data) < end:
            self._more()
        one, self.data = self.data[:end], self.data[end:]
        return one


def test_an_http_1_0_request_is_answered_at_once_then_closed(files: Files, pki: LabPKI) -> None:
    with serving(files, tls=False, keep_alive_timeout=30, request_head_timeout=30) as (port, app), \
            connect(files, pki, port, False) as sock:
        sock.sendall(get("/old", version="1.0"))
        answer = read_answer(sock)
        assert ended_by_server(sock) < PATIENCE
    assert b"\r\nconnection: close\r\n" in answer and seen(answer)["path"] == "/old"
    assert app.answered_at_once == 1


def test_nothing_is_answered_after_an_answer_that_ends_the_connection(files: Files, pki: LabPKI) -> None:
    with serving(files, tls=False, keep_alive_timeout=30, request_head_timeout=30) as (port, app), \
            connect(files, pki, port, False) as sock:
        # HTTP/1.0 asking for keep-alive: the parser reads on, uvicorn closes after the answer
        sock.sendall(get("/last", version="1.0", extra=b"connection: keep-alive\r\n") + get("/too-late"))
        reply = answer(sock)
    assert seen(reply)["path"] == "/last" and reply.count(b"HTTP/1.") == 1
    assert app.answered_at_once == 1 and app.asgi == 0


def test_a_body_sent_with_a_request_answered_at_once_is_read_and_dropped(files: Files, pki: LabPKI) -> None:
    with serving(files, tls=False) as (port, app), connect(files, pki, port, False) as sock:
        sock.sendall(get("/with-body", extra=b"content-length: 13\r\n") + b"GET /smuggled")
        assert seen(read_answer(sock))["path"] == "/with-body"
        sock.sendall(get("/next"))
        assert seen(read_answer(sock))["path"] == "/next"
    assert app.answered_at_once == 2 and app.asgi == 0


def test_an_answer_that_cannot_be_written_ends_the_connection(files: Files, pki: LabPKI,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    with serving(files, tls=False) as (port, app), connect(files, pki, port, False) as sock:
        sock.sendall(get("/no-such-status"))
        assert answer(sock) == b""
    assert app.finished == 0   # nothing was answered: nothing is logged or recorded as answered
    assert "writing an answer given at once failed" in caplog.text


def test_a_stopping_server_answers_a_request_under_way_at_once_then_closes(files: Files, pki: LabPKI) -> None:
    app = Answers()
    config = uvicorn.Config(app, log_level="warning", proxy_headers=False,
                            **files.listener("httptools", tls=False, **{**SHORT, "keep_alive_timeout": 30,
                                                                          "request_head_timeout": 30}))
    server = uvicorn.Server(config)
    listening_socket = socket.socket()
    listening_socket.bind(("127.0.0.1", 0))
    listening_socket.listen(8)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening_socket]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        with socket.create_connection(listening_socket.getsockname(), timeout=PATIENCE) as sock:
            sock.sendall(b"GET /last HTTP/1.1\r\nHost: 127.0.0.1\r\n")   # a head under way
            time.sleep(0.3)
            server.should_exit = True
            time.sleep(0.5)   # the server has told its connections
            sock.sendall(b"\r\n")
            reply = answer(sock)
    finally:
        server.should_exit = True
        thread.join(10)
        listening_socket.close()
    assert b"\r\nconnection: close\r\n" in reply and seen(reply)["path"] == "/last"
    assert app.answered_at_once == 1


def test_a_request_that_expects_100_continue_goes_the_asgi_way(files: Files, pki: LabPKI) -> None:
    with serving(files, tls=False) as (port, app), connect(files, pki, port, False) as sock:
        sock.sendall(get("/upload", extra=b"content-length: 2\r\nexpect: 100-continue\r\n") + b"ok")
        assert seen(read_answer(sock))["path"] == "/upload"
    assert app.answered_at_once == 0 and app.asgi == 1


def test_an_app_that_fails_to_answer_at_once_answers_the_asgi_way(files: Files, pki: LabPKI,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    with serving(files) as (port, app), connect(files, pki, port, True) as sock:
        sock.sendall(get("/fail"))
        assert seen(read_answer(sock))["path"] == "/fail"
    assert app.asgi == 1
    assert "answering at once failed: answering the usual way" in caplog.text


def test_a_failure_after_an_answer_given_at_once_leaves_the_connection_serving(
        files: Files, pki: LabPKI, caplog: pytest.LogCaptureFixture) -> None:
    with serving(files) as (port, app), connect(files, pki, port, True) as sock:
        sock.sendall(get("/fail-after"))
        assert seen(read_answer(sock))["path"] == "/fail-after"
        sock.sendall(get("/next"))
        assert seen(read_answer(sock))["path"] == "/next"
    assert app.answered_at_once == 2 and app.finished == 1
    assert "finishing an answer given at once failed" in caplog.text


def test_over_uvicorn_s_concurrency_limit_nothing_is_answered_at_once(files: Files, pki: LabPKI) -> None:
    app = Answers()
    with listening(app, limit_concurrency=1, **files.listener("httptools", tls=False, **SHORT)) as port, \
            connect(files, pki, port, False) as sock:
        sock.sendall(get("/"))
        assert read_answer(sock).startswith(b"HTTP/1.1 503 ")
    assert app.answered_at_once == app.asgi == 0


# -- the same limits -------------------------------------------------------------------------------


@by_listener
def test_a_whole_request_head_over_the_limit_is_answered_431_not_at_once(files: Files, pki: LabPKI, tls: bool) -> None:
    with serving(files, tls) as (port, app), connect(files, pki, port, tls) as sock:
        sock.sendall(head(LIMIT + 1024, complete=True))
        reply = read_answer(sock)
    assert reply.startswith(b"HTTP/1.1 431 ") and reply.endswith(b"\r\n\r\n# request header too large\n")
    assert app.answered_at_once == app.asgi == 0


def test_after_an_answer_given_at_once_an_idle_connection_is_closed(files: Files, pki: LabPKI) -> None:
    with serving(files) as (port, app), connect(files, pki, port, True) as sock:
        sock.sendall(get("/"))
        read_answer(sock)
        assert ended_by_server(sock) < PATIENCE
    assert app.answered_at_once == 1


def test_after_an_answer_given_at_once_a_slow_request_head_is_closed(files: Files, pki: LabPKI) -> None:
    # keep_alive_timeout long: only the head timeout can end it
    with serving(files, keep_alive_timeout=30) as (port, app), connect(files, pki, port, True) as sock:
        sock.sendall(get("/"))
        read_answer(sock)
        sock.sendall(b"GET / HTTP/1.1\r\n")
        assert ended_by_server(sock) < PATIENCE
    assert app.answered_at_once == 1


def test_a_connection_answered_at_once_counts_as_idle_at_the_cap(files: Files, pki: LabPKI) -> None:
    with serving(files, tls=False, max_connections=2, keep_alive_timeout=30, request_head_timeout=30) as (port, _), \
            connect(files, pki, port, False) as answered:
        answered.sendall(get("/first"))
        read_answer(answered)
        with connect(files, pki, port, False) as later, connect(files, pki, port, False) as newcomer:
            # idle longest: dropped for the newcomer (a connection left busy would keep its place)
            assert ended_by_server(answered) < PATIENCE
            for sock, path in ((later, "/second"), (newcomer, "/third")):
                sock.sendall(get(path))
                assert seen(read_answer(sock))["path"] == path
