"""The lab device: poll a server over mutual TLS the way an innovaphone device does.

    device = open_lab(Path("lab")).device("IP232-30-00-af")
    answer = poll("https://127.0.0.1:8443/update", cert=device.cert, key=device.key,
                  server_ca=lab.server_ca)
    answer.status_line, answer.body

The server is verified against the given CA (the lab's server CA), as a device verifies its
update server against its trust list.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from .workspace import LabError

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["Answer", "NoAnswer", "poll", "server_url", "with_path"]


class NoAnswer(LabError):
    """The server gave no HTTP answer: nothing listens, the TLS handshake failed, or it timed out."""


@dataclass(frozen=True)
class Answer:
    """What the device received."""

    status: int
    reason: str
    http_version: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def status_line(self) -> str:
        """`HTTP/1.1 200 OK`"""
        return f"{self.http_version} {self.status} {self.reason}".rstrip()

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def header(self, name: str) -> str | None:
        """The first header of that name (case-insensitive), or None."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


def server_url(settings: "Settings") -> str:
    """`https://host:port` of the built-in listener these settings describe.

    Raises LabError when the settings serve plain HTTP for a terminator: the device must then
    be pointed at the terminator instead.
    """
    if not settings.builtin_tls:
        raise LabError(
            "these settings serve plain HTTP behind a TLS terminator (no tls_cert): "
            "give the terminator's address with --url https://HOST:PORT"
        )
    if settings.uds is not None:
        raise LabError(f"the server listens on the unix socket {settings.uds}: give its address with --url")
    host = settings.host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"https://{host}:{settings.port}"


def with_path(url: str, path: str | None) -> str:
    """`url` with its path and query replaced by `path` (`/update?hwid=...`), when given."""
    if path is None:
        return url
    if not path.startswith("/"):
        path = "/" + path
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "", "", "")) + path


def poll(url: str, *, cert: Path, key: Path, server_ca: Path, timeout: float = 10.0) -> Answer:
    """GET `url` over HTTPS, showing the device certificate `cert` (with its `key`).

    The server must present a certificate issued by `server_ca` for the URL's host.
    Returns the answer, whatever its status. Raises NoAnswer when there is none, with the
    likely reason: a refused TLS handshake shows as the server closing the connection.
    """
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise LabError(f"{url}: a device polls over https://")
    context = ssl.create_default_context(cafile=str(server_ca))
    context.load_cert_chain(cert, key)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection = http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout, context=context)
    where = f"{parts.hostname}:{parts.port or 443}"
    try:
        connection.request("GET", target, headers={"User-Agent": "configserver-lab-device", "Connection": "close"})
        response = connection.getresponse()
        body = response.read()
    except ssl.SSLCertVerificationError as exc:
        raise NoAnswer(f"{where} is not the lab server: its certificate does not verify ({exc.verify_message})") from None
    except ConnectionRefusedError:
        raise NoAnswer(f"nothing listens on {where}: is `configserver serve` running?") from None
    except (socket.timeout, TimeoutError):
        raise NoAnswer(f"{where} did not answer within {timeout:g} s") from None
    except (ssl.SSLError, ConnectionError, http.client.RemoteDisconnected) as exc:
        raise NoAnswer(
            f"{where} closed the connection without an answer: it refused this device's certificate "
            f"in the TLS handshake ({type(exc).__name__}: {exc})"
        ) from None
    finally:
        connection.close()
    version = {10: "HTTP/1.0", 11: "HTTP/1.1"}.get(response.version, "HTTP/1.1")
    return Answer(
        status=response.status,
        reason=response.reason,
        http_version=version,
        headers=tuple(response.getheaders()),
        body=body,
    )
