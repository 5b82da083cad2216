"""Taking one upload from an admitted device: read the body whole and bounded, check what it is,
store it under the device its certificate names, and say how it went.

The admission (the same as a poll's, with its `device mismatch`) has run before this; here the
device is known. The outcome carries a status, a reason for the log and the metrics, and the
one-line answer; none of them ever holds a byte of the upload, which carries passwords.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import ConfigserverError
from ._facts import FactsUnreadable, parse_certificate_facts, parse_device_facts
from ._store import BackupStore
from ._text import NotText, check_text, decode
from ._urls import CONFIG, X509, UnknownUpload, upload_kind

# Reasons, in the answer (`# upload too large`), the log line and the metrics label alike.
STORED = "stored"
UNCHANGED = "unchanged"
FACTS_KEPT = "facts kept"
TOO_LARGE = "upload too large"
INCOMPLETE = "upload incomplete"
TOO_SLOW = "upload too slow"
# A device's configuration is a few hundred KB at most: a body still arriving after this long is
# a client holding a connection open, not a device uploading (the listeners bound only the head).
UPLOAD_SECONDS = 60.0
NOT_TEXT = "upload is not text"
EMPTY = "empty upload"
UNKNOWN = "unknown upload"
FACTS_UNREADABLE = "facts unreadable"
NOT_STORED = "backup not stored"


class Device(Protocol):
    """The admitted device, as the admission names it."""

    hwid: str
    mac: str
    model: str


class BodyTooLarge(ConfigserverError):
    """The body is over the limit (as declared, or as it arrived)."""


class BodyTooSlow(ConfigserverError):
    """The body did not arrive whole within UPLOAD_SECONDS."""


class BodyIncomplete(ConfigserverError):
    """The client went away before the body was complete."""


@dataclass(frozen=True, slots=True)
class UploadOutcome:
    """How an upload went: status and reason for the answer, the log and the metrics."""

    status: int
    reason: str
    detail: str | None = None     # for the log only; never any of the upload
    what: str | None = None       # config, x509 or cmd0, once known
    number: int | None = None     # the configuration version now newest
    size: int | None = None

    @property
    def body(self) -> bytes:
        """The answer: one comment line, as a poll's refusals are."""
        text = f"# {self.reason}" if self.number is None else f"# {self.reason}: version {self.number}"
        return (text + "\n").encode()


def refused_before_reading(declared_length: int | None, limit: int) -> UploadOutcome | None:
    """The outcome for an upload refused on its headers alone (a Content-Length over the limit)."""
    if declared_length is not None and declared_length > limit:
        return UploadOutcome(413, TOO_LARGE, f"content-length {declared_length} > {limit}")
    return None


async def read_body(
    receive: Callable[[], Awaitable[Mapping[str, Any]]], limit: int, seconds: float = UPLOAD_SECONDS,
) -> bytes:
    """Read an ASGI request body whole, chunked or not, never more than `limit` bytes, within
    `seconds`.

    Raises BodyTooLarge as soon as more than `limit` bytes arrived, BodyTooSlow when the body is
    not whole in time, and BodyIncomplete when the client disconnects first: either way nothing
    of it is kept.
    """
    try:
        async with asyncio.timeout(seconds):
            return await _read_body(receive, limit)
    except TimeoutError:
        raise BodyTooSlow from None


async def _read_body(receive: Callable[[], Awaitable[Mapping[str, Any]]], limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BodyIncomplete
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def receive_upload(
    store: BackupStore,
    device: Device,
    query: Mapping[str, Sequence[str]],
    body: bytes,
    *,
    uploaded: Callable[[str, float], None] | None = None,
    now: float | None = None,
) -> UploadOutcome:
    """Store one complete upload of an admitted device, or refuse it; stores nothing on refusal.

    `uploaded(mac, time)` is told of a configuration stored (or found unchanged), so this node's
    schedule stops asking at once. Database failures become a 503 outcome, never an exception.
    """
    now = time.time() if now is None else now
    try:
        kind = upload_kind(query)
    except UnknownUpload as exc:
        return UploadOutcome(400, UNKNOWN, str(exc), size=len(body))
    if not body.strip():
        return UploadOutcome(400, EMPTY, what=kind.what, size=len(body))
    try:
        check_text(body)
    except NotText as exc:
        return UploadOutcome(415, NOT_TEXT, str(exc), what=kind.what, size=len(body))
    try:
        if kind.what == CONFIG:
            stored = await store.store_config(mac=device.mac, hwid=device.hwid, model=device.model, body=body, now=now)
            if uploaded is not None:
                uploaded(device.mac, now)
            return UploadOutcome(200, STORED if stored.kept else UNCHANGED, what=CONFIG, number=stored.number,
                                 size=len(body))
        text = decode(body)
        try:
            facts = parse_certificate_facts(text) if kind.what == X509 else parse_device_facts(text)
        except FactsUnreadable as exc:
            return UploadOutcome(400, FACTS_UNREADABLE, str(exc), what=kind.what, size=len(body))
        await store.store_facts(mac=device.mac, hwid=device.hwid, source=kind.what, facts=facts.as_json(), now=now)
        return UploadOutcome(200, FACTS_KEPT, what=kind.what, size=len(body))
    except Exception as exc:  # noqa: BLE001 - the database is away: the device uploads again when asked
        # The type only: a driver's message may quote the statement's parameters, the backup.
        return UploadOutcome(503, NOT_STORED, type(exc).__name__, what=kind.what, size=len(body))
