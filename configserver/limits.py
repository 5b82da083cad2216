"""How long and how many: the limits each connection lives under, on either listener.

A device's poll is one short request: a TLS handshake (built-in listener), a request head under
2 KB, an answer, perhaps a second poll on the same connection. Whoever can reach the port can do
much less and cost much more: open connections that never start the handshake, send nothing or
half a head after it, or a head of 150 MB. uvicorn bounds none of that (its `limit_concurrency`
answers 503 to requests, but the idle connections stay and hold their file descriptors; its TLS
handshake may take asyncio's 60 s; it waits for the first request head forever; httptools
buffers a head of any size). So each connection runs under `ListenerLimits`:

- the TLS handshake must finish within `tls_handshake_timeout` (this module starts TLS itself,
  `loop.start_tls`, so that the timeout is ours and a connection is counted from its first byte);
- each request head must be complete within `request_head_timeout` of the listener waiting for it
  (after the handshake, or after the previous answer), checked by one timer per listener, so
  with up to a quarter of the timeout (a second at most) of lateness; between requests an idle
  connection is closed after `keep_alive_timeout` (uvicorn's own keep-alive timer);
- a request head larger than `max_request_head_bytes` is answered `431 # request header too large`
  and the connection closed, before it is buffered: with httptools by counting what arrives, with
  h11 by its own incomplete-event limit, and for a head that arrives whole by its parsed size;
- at most `max_connections` connections per worker, handshakes included. When a new one would pass
  the cap, the connection that has been idle longest (in its handshake, or waiting for a head) is
  dropped for it; a connection inside a request is never dropped. A flood thus cycles through its
  own connections, and a device's connection, being new, lives long enough to be answered.

`GuardedH11Protocol` and `GuardedHttpToolsProtocol` are uvicorn's two HTTP protocols with these
limits; `configserver.tls.uvicorn_options` hands one to uvicorn for every `serve`.

An app may also answer a request at once (`AnsweredAtOnce`): a poll needs nothing awaited, and
uvicorn's task and ASGI messages per request cost a poll tens of µs between handshakes. The
httptools protocol then writes the answer itself, under the same limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import sys
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import ConfigserverError

if TYPE_CHECKING:
    from .settings import Settings
    from .tls import ServerTLS

__all__ = [
    "AnsweredAtOnce",
    "Connections",
    "GuardedH11Protocol",
    "GuardedHttpToolsProtocol",
    "Listener",
    "ListenerLimits",
    "OneWrite",
    "answer_bytes",
    "head_size",
    "too_large_response",
]

log = logging.getLogger("configserver.listener")

ASGIApp = Callable[..., Any]

HEAD_TOO_LARGE_BODY = b"# request header too large\n"

# File descriptors a worker needs besides its connections: database pool, templates being read,
# log and metrics files, the listening socket. What `max_connections` must leave room for.
FD_RESERVE = 128


def _default(name: str) -> Any:
    from .settings import Settings   # the one home of the defaults

    return Settings.model_fields[name].default


@dataclass(frozen=True)
class ListenerLimits:
    """The limits of one listener; the settings of the same names (README, "Settings")."""

    tls_handshake_timeout: float = _default("tls_handshake_timeout")
    request_head_timeout: float = _default("request_head_timeout")
    keep_alive_timeout: float = _default("keep_alive_timeout")
    max_connections: int = _default("max_connections")
    max_request_head_bytes: int = _default("max_request_head_bytes")

    @classmethod
    def from_settings(cls, settings: "Settings") -> "ListenerLimits":
        return cls(
            tls_handshake_timeout=settings.tls_handshake_timeout,
            request_head_timeout=settings.request_head_timeout,
            keep_alive_timeout=settings.keep_alive_timeout,
            max_connections=settings.max_connections,
            max_request_head_bytes=settings.max_request_head_bytes,
        )


@dataclass(frozen=True)
class Listener:
    """What every connection of one listener needs: its limits, and its TLS when built in.

    Small and picklable: uvicorn hands it to each worker process inside the protocol factory.
    """

    limits: ListenerLimits
    tls: "ServerTLS | None" = None

    def ssl_context(self) -> ssl.SSLContext:
        """The server context, built once per process (a worker builds its own; `serve` builds
        the first one when it checks the files, before it listens).

        Raises SettingsError when the files no longer make one (replaced since they were checked).
        """
        assert self.tls is not None
        context = _contexts.get(self.tls)
        if context is None:
            context = _contexts[self.tls] = self.tls.ssl_context()
        return context

    def __setstate__(self, state: dict[str, Any]) -> None:
        # unpickled in a worker as it starts (uvicorn spawns them): its context is built now,
        # before it accepts, not at its first connection; when the files make none, each
        # connection's handshake says why (once)
        self.__dict__.update(state)
        if self.tls is not None:
            with contextlib.suppress(ConfigserverError):
                self.ssl_context()


_contexts: dict["ServerTLS", ssl.SSLContext] = {}
_told: set[str] = set()   # why this process could not build its context, each reason logged once


class AnsweredAtOnce(NamedTuple):
    """An answer an app gives to a request head without awaiting anything.

    An ASGI app that has `answer_at_once(scope) -> AnsweredAtOnce | None` is asked first, with
    the request's whole scope, for the first request of each read the httptools protocol would
    hand it (devices and terminators send one request at a time; a client that pipelines gets
    the rest answered the ASGI way, each in its turn); None sends the request the ASGI way.
    The protocol then writes the answer as uvicorn writes a whole answer (`answer_bytes`: its
    status line and default headers, then `headers`, `connection: close` when the connection
    ends after it, the body unless HEAD), ends uvicorn's request cycle as it would, and calls
    `then` (logging, counting, recording). The request's body, if any, is read and dropped.

    `headers` are written as given: the app's own, with a content-length, and neither a
    connection nor a transfer-encoding header. uvicorn's request cycle is still made; its task
    and ASGI messages are what an answer given at once saves. Such an answer is in no access
    log of uvicorn's: the app logs it. An app uvicorn wraps (its proxy_headers or trace
    logging) is not asked: `serve` runs uvicorn with proxy_headers off (tests/test_serve.py).
    """

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    then: Callable[[], None]


# --- pure rules -------------------------------------------------------------------------------


def head_size(scope: Mapping[str, Any]) -> int:
    """The size in bytes of the request head an ASGI HTTP scope came from, as sent on the wire
    (request line and header lines with their line ends), give or take a few bytes."""
    size = len(scope.get("method", "")) + len(scope.get("raw_path", b"")) + len(scope.get("query_string", b""))
    size += 16  # " ", "?", " HTTP/1.1\r\n", the blank line
    for name, value in scope.get("headers", ()):
        size += len(name) + len(value) + 4  # ": " and "\r\n"
    return size


_TOO_LARGE_HEADERS = [
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"content-length", b"%d" % len(HEAD_TOO_LARGE_BODY)),
    (b"cache-control", b"no-store"),
    (b"connection", b"close"),
]


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase)


# as uvicorn writes them
_STATUS_LINES = {status: _status_line(status) for status in range(100, 600)}


def answer_bytes(status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes, *, close: bool = False) -> bytes:
    """A whole answer as uvicorn writes one: the status line, `headers`, `connection: close`
    when `close` (the connection ends after it), a blank line, the body (the caller gives none
    for HEAD)."""
    content = [_STATUS_LINES[status]]
    for name, value in headers:
        content += (name, b": ", value, b"\r\n")
    if close:
        content.append(b"connection: close\r\n")
    content += (b"\r\n", body)
    return b"".join(content)


def too_large_response(default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """The whole `431` answer to a request head over the limit, for writing straight to the
    connection (the head is incomplete, so uvicorn has no request to answer); it closes after."""
    return answer_bytes(431, [*default_headers, *_TOO_LARGE_HEADERS], HEAD_TOO_LARGE_BODY)


class Connections:
    """The connections of one worker's listener, and which to drop when a new one would pass the cap.

    A connection is idle while in its TLS handshake or waiting for a request head, busy from a
    complete head until its answer is sent. `admit` returns the connection to drop for the new one
    (the one idle longest), or the new one itself when every connection is busy.
    """

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._idle: dict[Any, float] = {}  # since when, in the order they became idle: oldest first
        self._busy: set[Any] = set()
        self.watched = False  # a sweep for heads that came too late is scheduled (_watch_heads)

    def __len__(self) -> int:
        return len(self._idle) + len(self._busy)

    def admit(self, connection: Any) -> Any | None:
        """Count a new connection as idle. Returns the connection to close now, if any."""
        dropped = None
        if len(self) >= self.limit:
            if not self._idle:
                return connection
            dropped = next(iter(self._idle))
            self.discard(dropped)
        self._idle[connection] = self._clock()
        return dropped

    def busy(self, connection: Any) -> None:
        if connection in self._idle:
            del self._idle[connection]
            self._busy.add(connection)

    def idle(self, connection: Any) -> None:
        if connection in self._busy or connection in self._idle:
            self.discard(connection)
            self._idle[connection] = self._clock()  # now the youngest idle one

    def idle_longer_than(self, seconds: float) -> list[Any]:
        """The connections idle for more than `seconds`, oldest first."""
        deadline = self._clock() - seconds
        longer = []
        for connection, since in self._idle.items():
            if since > deadline:
                break   # the rest became idle later still
            longer.append(connection)
        return longer

    def discard(self, connection: Any) -> None:
        self._idle.pop(connection, None)
        self._busy.discard(connection)


class OneWrite:
    """The transport as a request cycle writes to it: an answer's head is held until its body
    follows, and both leave in one write.

    uvicorn writes the head and the body of an answer separately: two system calls per poll, and
    a terminator that reads the head, waits, and reads again. `send` of each request tells this
    transport when a head is coming (`hold_next`) and when a message is done (`flush`): a head
    without a body (HEAD, or an app that fails after the head) still leaves, alone. A streamed
    answer's head leaves with its first part, so an app that sends its head and then waits
    delays the head as long (none of ours does: every answer is whole when its head is sent).
    """

    __slots__ = ("transport", "_held", "_hold_next")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._held: bytes | None = None
        self._hold_next = False

    def hold_next(self, hold: bool = True) -> None:
        self._hold_next = hold

    def write(self, data: bytes) -> None:
        if not data:   # h11's end of a sized answer: nothing to send
            return
        if self._hold_next:
            self._hold_next = False
            self.flush()   # a head still held (none is, the way uvicorn writes) leaves first
            self._held = data
            return
        if self._held is not None:
            data, self._held = self._held + data, None
        self.transport.write(data)

    def flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self.transport.write(held)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:   # everything else a cycle may ask of its transport
        return getattr(self.transport, name)


# One Connections per uvicorn server (ServerState), so that servers in one process stay apart.
_registries: "weakref.WeakKeyDictionary[Any, Connections]" = weakref.WeakKeyDictionary()


def _connections_of(server_state: Any, limit: int) -> Connections:
    registry = _registries.get(server_state)
    if registry is None:
        registry = _registries[server_state] = Connections(limit)
    return registry


def _watch_heads(registry: Connections, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
    """Close the connections that have waited longer than `timeout` for a request head, now and
    every quarter of `timeout` (at most every second) while the listener has connections.

    One timer per listener instead of one per request: a head comes too late between `timeout`
    and a quarter more (a second more at most) after the listener began to wait for it.
    """
    try:
        for connection in registry.idle_longer_than(timeout):
            try:
                connection._head_timed_out()
            except Exception:  # one connection's failure must not spare the others, nor stop the watch
                log.exception("closing a connection whose request head came too late failed")
    finally:
        if len(registry):
            registry.watched = True
            loop.call_later(min(timeout / 4, 1.0), _watch_heads, registry, loop, timeout)
        else:
            registry.watched = False


# --- the protocol -------------------------------------------------------------------------------


class _Guarded:
    """Mixed into a uvicorn HTTP protocol: one instance serves one connection, from accept to close.

    uvicorn's protocol sees the connection only once it is ready: the TCP connection on the header
    path, the TLS connection after the handshake on the built-in listener. Until then this class
    holds it (`_raw`), counted, under the handshake timeout.
    """

    # set by uvicorn's protocol
    app: ASGIApp
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    connections: set[Any]
    server_state: Any
    cycle: Any

    def __init__(self, *args: Any, listener: Listener, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._listener = listener
        self._limits = listener.limits
        self._registry = _connections_of(self.server_state, self._limits.max_connections)
        self._raw: asyncio.BaseTransport | None = None
        self._ready = False  # uvicorn's connection_made has run
        self._lost = False
        self._early: list[bytes] | None = []  # TLS data that came before we were ready
        self._shutting_down = False
        self._refused = False
        self._waiting_for_head = False
        self._head_bytes = 0
        self._writer: OneWrite
        self._at_once: Callable[[dict[str, Any]], AnsweredAtOnce | None] | None = None
        self._tls: dict[str, Any] | None = None   # the ASGI TLS extension of the built-in listener

    # -- from accept to ready

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        self._raw = transport
        self.connections.add(self)  # so that a graceful shutdown waits for a handshake, too
        dropped = self._registry.admit(self)
        if dropped is not None:
            log.debug("connection limit %d reached: dropping the connection idle longest", self._limits.max_connections)
            dropped._drop()
            if dropped is self:
                return
        if self._listener.tls is None:
            self._become_ready(transport)  # type: ignore[arg-type]
        else:
            _start_now(self._handshake(transport))

    async def _handshake(self, raw: asyncio.BaseTransport) -> None:
        try:
            context = self._listener.ssl_context()
        except ConfigserverError as exc:   # no device can connect: not a client's failure, said once
            if str(exc) not in _told:
                _told.add(str(exc))
                log.error("no TLS handshake can succeed: %s", exc)
            raw.abort()  # type: ignore[attr-defined]
            self._forget()
            return
        try:
            transport = await self.loop.start_tls(
                raw, self, context, server_side=True,  # type: ignore[arg-type]
                ssl_handshake_timeout=self._limits.tls_handshake_timeout,
                # a peer that never answers our close_notify must not keep its descriptor long
                ssl_shutdown_timeout=self._limits.tls_handshake_timeout,
            )
        except Exception as exc:  # refused certificate, timeout, reset: the connection is gone
            log.debug("TLS handshake failed: %s", exc)
            raw.abort()  # type: ignore[attr-defined]
            self._forget()
            return
        if transport is None or transport.is_closing() or raw.is_closing():
            # dropped or reset during the handshake: uvloop then ends start_tls without an error
            self._forget()
            return
        if not self._lost:
            self._become_ready(transport)

    def _become_ready(self, transport: asyncio.Transport) -> None:
        self._ready = True
        self._writer = OneWrite(transport)
        super().connection_made(transport)  # type: ignore[misc]
        # asked before the ASGI way (AnsweredAtOnce); an app uvicorn wrapped (trace logging) is not
        self._at_once = getattr(self.app, "answer_at_once", None)
        self._tls = self._tls_extension(transport)
        self.app = self._guarded_app(self.app)
        self._await_head()
        early, self._early = self._early, None
        for data in early or ():
            if not self._refused and not transport.is_closing():
                self.data_received(data)

    def _tls_extension(self, transport: asyncio.Transport) -> dict[str, Any] | None:
        from .tls import tls_extension

        ssl_object = transport.get_extra_info("ssl_object")
        return tls_extension(ssl_object) if ssl_object is not None else None

    def _over_limit(self, scope: dict[str, Any]) -> bool:
        """Whether a request head that came whole in one read is over the limit all the same
        (parsed, but answered 431)."""
        return scope["type"] == "http" and head_size(scope) > self._limits.max_request_head_bytes

    def _add_tls(self, scope: dict[str, Any]) -> None:
        """The ASGI TLS extension of the built-in listener (uvicorn does not fill it); a copy per
        request, made once (a request the app did not answer at once has it already)."""
        tls = self._tls
        if tls is not None and scope["type"] in ("http", "websocket") and "tls" not in scope.get("extensions", ()):
            scope.setdefault("extensions", {})["tls"] = dict(tls, client_cert_chain=list(tls["client_cert_chain"]))

    def _guarded_app(self, app: ASGIApp) -> ASGIApp:
        async def guarded_app(scope: dict[str, Any], receive: Any, send: Any) -> Any:
            if self._over_limit(scope):
                await send({"type": "http.response.start", "status": 431, "headers": _TOO_LARGE_HEADERS})
                await send({"type": "http.response.body", "body": HEAD_TOO_LARGE_BODY})
                return None
            self._add_tls(scope)
            if scope["type"] != "http":
                return await app(scope, receive, send)
            writer = self._writer

            async def send_whole(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    writer.hold_next()
                    try:
                        await send(message)
                    finally:
                        writer.hold_next(False)   # written and held, or refused by uvicorn: hold no more
                else:
                    await send(message)
                    writer.flush()

            return await app(scope, receive, send_whole)

        return guarded_app

    # -- reading request heads

    def data_received(self, data: bytes) -> None:
        if self._early is not None:  # TLS: the handshake finished, our task has not resumed yet
            self._early.append(data)
            return
        if self._refused:
            return
        if self._waiting_for_head:
            self._head_bytes += len(data)
        before = self.cycle
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not before and not self.cycle.response_complete:   # not answered at once
            self._head_arrived()
        if self._waiting_for_head and self._head_bytes > self._limits.max_request_head_bytes:
            self._refuse_head()

    def send_400_response(self, msg: str) -> None:
        # h11 refuses an incomplete head over its limit with this hint: answer what it is
        error = sys.exc_info()[1]
        if isinstance(error, h11.RemoteProtocolError) and error.error_status_hint == 431:
            self._refuse_head()
        else:
            super().send_400_response(msg)  # type: ignore[misc]

    def _refuse_head(self) -> None:
        self._refused = True
        if not self.transport.is_closing():
            self.transport.write(too_large_response(self.server_state.default_headers))
            self.transport.close()

    def _await_head(self) -> None:
        self._waiting_for_head = True
        self._head_bytes = 0
        self._registry.idle(self)
        if not self._registry.watched:
            _watch_heads(self._registry, self.loop, self._limits.request_head_timeout)

    def _head_arrived(self) -> None:
        self._write_once()
        self._waiting_for_head = False
        self._registry.busy(self)
        if self._shutting_down and self.cycle is not None:
            self.cycle.keep_alive = False  # the server is stopping: this answer, then close

    def _head_timed_out(self) -> None:
        if self._ready and self._waiting_for_head and not self.transport.is_closing():
            log.debug("no complete request head within %ss: closing", self._limits.request_head_timeout)
            self.transport.abort()

    def _write_once(self) -> None:
        """The newest request cycle writes through the one-write transport. h11 makes one cycle at
        a time (in data_received, or in on_response_complete for a pipelined request); httptools
        may make several in one read, and hands each over as it makes it (on_headers_complete)."""
        if self.cycle is not None:
            self.cycle.transport = self._writer

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._write_once()   # h11 makes the next pipelined request's cycle only now
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:  # no pipelined request already under way
            self._await_head()

    # -- the end

    def _drop(self) -> None:
        """Close now, without a goodbye: the cap needs the descriptor."""
        transport = self.transport if self._ready else self._raw
        if transport is not None and not transport.is_closing():
            transport.abort()  # type: ignore[attr-defined]

    def shutdown(self) -> None:
        """The server is stopping (SIGTERM): answer what has come in, then close.

        uvicorn closes a connection that has no request under way at once, even when the request
        already waits in the kernel because the loop was busy rendering: that device's poll would
        fail. A connection still in its handshake, or with (part of) a head received or waiting
        to be read, is kept; its one request is answered with `connection: close`, and the
        handshake and head timeouts still bound it.
        """
        self._shutting_down = True
        if not self._ready:
            return
        if self._waiting_for_head and (self._head_bytes or _unread_bytes(self.transport)):
            return
        super().shutdown()  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._forget()
        if self._ready:
            super().connection_lost(exc)  # type: ignore[misc]

    def _forget(self) -> None:
        self._registry.discard(self)
        self.connections.discard(self)


def _unread_bytes(transport: asyncio.BaseTransport) -> bool:
    """Whether the peer has sent bytes the loop has not read yet (a peek at the kernel's buffer)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        # uvloop hands out a stand-in that cannot recv: peek through a duplicate of the descriptor
        with socket.socket(fileno=os.dup(sock.fileno())) as peek:
            return bool(peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # nothing waiting (EAGAIN), or the connection is gone
        return False


def _start_now(coroutine: Any) -> None:
    """Run `coroutine` at once up to its first wait, then on as a task would (Python 3.12 calls
    this an eager task).

    `start_tls` must take the connection over before the loop reads from it: uvloop starts
    reading as soon as `connection_made` returns, whatever the protocol paused, and a ClientHello
    read by the HTTP protocol is lost. The first step of `start_tls` hands the connection to the
    TLS protocol, which keeps whatever arrives until the handshake starts.
    """

    def step(_: Any = None) -> None:
        try:
            waiting = coroutine.send(None)
        except StopIteration:
            return
        waiting.add_done_callback(step)

    step()


class GuardedH11Protocol(_Guarded, H11Protocol):
    """uvicorn's h11 protocol under the listener's limits."""


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is optional in uvicorn
    HttpToolsProtocol = None  # type: ignore[assignment,misc]
    GuardedHttpToolsProtocol = None  # type: ignore[assignment,misc]
else:

    class GuardedHttpToolsProtocol(_Guarded, HttpToolsProtocol):  # type: ignore[no-redef]
        """uvicorn's httptools protocol under the listener's limits, writing an answer its app
        gives at once (AnsweredAtOnce) itself."""

        # Only a request started while a read is parsed is answered at once, and only the first
        # one started in it: once a request goes the ASGI way, uvicorn queues the rest of the
        # read behind it, and starts each in its turn from the end of the one before, where no
        # answer is given at once. A client that pipelines a thousand requests thus holds up no
        # other connection, and no answer is written inside another's end.
        _may_answer_at_once = False

        def data_received(self, data: bytes) -> None:
            self._may_answer_at_once = True
            try:
                super().data_received(data)
            finally:
                self._may_answer_at_once = False

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._write_once()   # each cycle as it is made: pipelined ones are made in one read

        def _start_asgi_task(self, cycle: Any, app: ASGIApp) -> None:
            # uvicorn's step from a complete head (or a pipelined one, once its turn comes) to
            # the app: the scope is whole, the cycle made, concurrency and pipelining decided
            if self.transport.is_closing():
                # the connection is ending (an answer of this read said `connection: close`, a
                # head was refused, a write failed): no request is started after that, either way
                return
            answer = self._given_at_once(cycle, app)
            if answer is None:
                self._unset_keepalive_if_required()   # armed by an answer given at once in this read
                super()._start_asgi_task(cycle, app)
                return
            try:
                self._write_at_once(cycle, answer)
            except Exception:   # as uvicorn does when an app fails after its answer began
                log.exception("writing an answer given at once failed")
                self.transport.close()
                return
            try:
                answer.then()
            except Exception:   # the answer is out; what follows it must not end the connection
                log.exception("finishing an answer given at once failed")

        def _given_at_once(self, cycle: Any, app: ASGIApp) -> AnsweredAtOnce | None:
            """The app's answer to `cycle`'s request given at once, or None for the ASGI way."""
            if (self._at_once is None or not self._may_answer_at_once
                    or app is not self.app   # uvicorn's 503 over its limit_concurrency
                    or cycle.waiting_for_100_continue or self.flow.write_paused):
                return None
            scope = cycle.scope
            if self._over_limit(scope):
                return None   # the ASGI way answers 431
            self._may_answer_at_once = False
            self._add_tls(scope)
            try:
                return self._at_once(scope)
            except Exception:   # the app's fault: the ASGI way answers, and logs it
                log.exception("answering at once failed: answering the usual way")
                return None

        def _write_at_once(self, cycle: Any, answer: AnsweredAtOnce) -> None:
            """Write `answer` as uvicorn's cycle writes a whole answer, and end the cycle as it would."""
            self._head_arrived()   # busy until answered; a stopping server asks for `connection: close`
            body = answer.body if cycle.scope["method"] != "HEAD" else b""
            cycle.response_started = cycle.response_complete = True
            # through the one-write transport: a head it still holds leaves first
            self._writer.write(answer_bytes(answer.status, (*cycle.default_headers, *answer.headers), body,
                                            close=not cycle.keep_alive))
            if not cycle.keep_alive:
                self._writer.close()
            cycle.on_response()
