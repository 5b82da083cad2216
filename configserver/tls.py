"""The built-in HTTPS listener: mutual TLS in uvicorn, and the ASGI TLS extension it lacks.

With `tls_cert` and `tls_key` set, `configserver serve` terminates TLS itself: a client
certificate is required and verified against `ca_bundle` during the handshake, so a device from
a foreign or forged CA never gets as far as HTTP. The verified certificate then reaches the app
through `scope["extensions"]["tls"]` (ASGI TLS extension 0.2), the same way it would with any
server that implements the extension.

uvicorn 0.54 neither fills that extension nor bounds the TLS handshake, so the connection's
protocol (configserver/limits.py) starts TLS itself and fills the extension. `uvicorn_options`
gives uvicorn that protocol for every `serve`, built-in TLS or not, with the listener's limits:

    options = uvicorn_options(settings)
    uvicorn.run(app, host=..., port=..., **options)
"""

from __future__ import annotations

import functools
import logging
import resource
import ssl
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cryptography import x509

from .limits import (
    FD_RESERVE,
    GuardedH11Protocol,
    GuardedHttpToolsProtocol,
    Listener,
    ListenerLimits,
)
from .settings import SettingsError

log = logging.getLogger("configserver.listener")

if TYPE_CHECKING:
    from .settings import Settings

__all__ = [
    "ServerTLS",
    "is_device_listener",
    "server_ssl_context",
    "tls_extension",
    "uvicorn_options",
]

# ssl.SSLObject.version() names -> the protocol numbers the extension wants.
_TLS_VERSIONS = {"SSLv3": 0x0300, "TLSv1": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303, "TLSv1.3": 0x0304}

# OpenSSL cipher name -> IANA cipher suite number; filled from the first context that knows it.
_CIPHER_SUITES: dict[str, int] = {}


# --- The ASGI TLS extension -------------------------------------------------------------------


def tls_extension(ssl_object: ssl.SSLObject) -> dict[str, Any]:
    """The `scope["extensions"]["tls"]` value for one established TLS connection.

    Takes the connection's SSL object after the handshake; returns the dict that ASGI TLS
    extension 0.2 describes. `client_cert_chain` holds the client's leaf certificate only (PEM):
    Python before 3.13 does not expose the rest of the verified chain. `client_cert_error` is
    always None because the listener requires a verified certificate to finish the handshake.
    `server_cert` is None: Python's ssl does not expose our own certificate on a connection.
    """
    der = ssl_object.getpeercert(binary_form=True)
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": _subject_name(der) if der else None,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": _cipher_suite(ssl_object),
    }


def _subject_name(der: bytes) -> str | None:
    """The RFC 4514 subject, or None when cryptography cannot read it (its parser is stricter
    than OpenSSL's in places): the app then refuses the certificate it cannot read, instead of
    the connection failing here."""
    try:
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError:
        return None


def _cipher_suite(ssl_object: ssl.SSLObject) -> int | None:
    cipher = ssl_object.cipher()
    if cipher is None:
        return None
    name = cipher[0]
    if name not in _CIPHER_SUITES:
        # OpenSSL ids are 0x0300xxxx with the IANA number in the low 16 bits.
        for known in ssl_object.context.get_ciphers():
            _CIPHER_SUITES[known["name"]] = known["id"] & 0xFFFF
    return _CIPHER_SUITES.get(name)


def is_device_listener(scope: Mapping[str, Any]) -> bool:
    """Whether a request came in over TLS that this process terminated: the built-in listener,
    where every client is a device (or claims to be one) with a certificate.

    Such a request must not get what is meant for an admin's scraper on the local machine
    (`/metrics`): the built-in listener answers whoever can reach it. Requests forwarded by a
    terminator are told apart by their headers, not here.
    """
    return "tls" in (scope.get("extensions") or {}) or scope.get("scheme") in ("https", "wss")


# --- The server's SSL context -------------------------------------------------------------------


@dataclass(frozen=True)
class ServerTLS:
    """What the built-in listener needs from the settings. Small and picklable, so that
    uvicorn can hand it to each worker process, where it builds the SSL context."""

    cert: Path
    key: Path
    ca_bundle: Path
    min_version: str = "TLSv1.2"
    security_level: int | None = None

    @classmethod
    def from_settings(cls, settings: "Settings") -> "ServerTLS":
        """Raises SettingsError when built-in TLS is not configured or has no `ca_bundle`."""
        if settings.tls_cert is None or settings.tls_key is None:
            raise SettingsError("setting 'tls_cert': built-in TLS needs tls_cert and tls_key")
        if settings.ca_bundle is None:
            raise SettingsError(
                "setting 'ca_bundle': built-in TLS (tls_cert, tls_key) verifies device certificates "
                "against ca_bundle, which is not set"
            )
        if (
            settings.tls_min_version in ("TLSv1", "TLSv1.1")
            and settings.tls_security_level != 0
            and ssl.OPENSSL_VERSION_INFO >= (3,)
        ):
            raise SettingsError(
                f"setting 'tls_min_version': {settings.tls_min_version} needs tls_security_level = 0; "
                "OpenSSL 3 refuses TLS 1.0 and 1.1 at any higher level"
            )
        return cls(
            cert=settings.tls_cert,
            key=settings.tls_key,
            ca_bundle=settings.ca_bundle,
            min_version=settings.tls_min_version,
            security_level=settings.tls_security_level,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A server context that requires a client certificate issued by a CA in `ca_bundle`.

        Raises SettingsError naming `tls_cert`, `tls_key` or `ca_bundle` when a file is
        unusable.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(
                f"setting 'tls_cert'/'tls_key': cannot use {self.cert} with {self.key}: {_reason(exc)}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_verify_locations(cafile=self.ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(f"setting 'ca_bundle': cannot load {self.ca_bundle}: {_reason(exc)}") from None
        with warnings.catch_warnings():
            # Python deprecates TLS 1.0/1.1; the setting exists for devices that know nothing newer.
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion[self.min_version.replace(".", "_")]
        if self.security_level is not None:
            # OpenSSL's own DEFAULT list, not Python's stricter one: old firmware may know only
            # RSA key exchange. The level also governs which certificates verify (SHA-1, RSA-1024).
            context.set_ciphers(f"DEFAULT:@SECLEVEL={self.security_level}")
        return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    return getattr(exc, "strerror", None) or str(exc)


def server_ssl_context(settings: "Settings") -> ssl.SSLContext:
    """The SSL context of the built-in listener for these settings.

    Raises SettingsError naming the key at fault (`ca_bundle` when it is not set).
    """
    return ServerTLS.from_settings(settings).ssl_context()


def uvicorn_options(settings: "Settings", http: Literal["auto", "h11", "httptools"] = "auto") -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run` / `uvicorn.Config`, for every `serve`: the listener.

    The HTTP protocol (httptools when installed, else h11; `http` picks one) carrying the
    listener's limits and, with `tls_cert` and `tls_key` set, its TLS (uvicorn itself is then
    given no SSL options: the protocol starts TLS, see configserver/limits.py). Also uvicorn's
    keep-alive timeout and h11's head limit. Checks the SSL files now, so that a bad one stops
    start-up with a message naming its key, and raises the open-files limit to what
    `max_connections` needs. Raises SettingsError.

    Run uvicorn with `proxy_headers=False` as well: client addresses come from our own
    trusted-proxy rules, and nothing sits in front of the built-in listener.
    """
    limits = ListenerLimits.from_settings(settings)
    if settings.keep_alive_timeout > settings.request_head_timeout:
        # after an answer the listener waits for the next head: request_head_timeout ends the wait
        log.warning("keep_alive_timeout is longer than request_head_timeout, which closes an idle connection "
                    "first: raise request_head_timeout to keep connections open longer", extra={"fields": {
                        "event": "keep_alive_cut_short", "keep_alive_timeout": settings.keep_alive_timeout,
                        "request_head_timeout": settings.request_head_timeout}})
    server_tls = None
    if settings.builtin_tls:
        server_tls = ServerTLS.from_settings(settings)
    listener = Listener(limits, server_tls)
    if server_tls is not None:
        listener.ssl_context()   # checked now, and kept for this process's connections
    ensure_open_files(limits.max_connections + FD_RESERVE)
    if http == "auto":
        http = "httptools" if GuardedHttpToolsProtocol is not None else "h11"
    protocol = GuardedHttpToolsProtocol if http == "httptools" else GuardedH11Protocol
    return {
        # a partial of a module-level class: it pickles, so it reaches every worker process
        "http": functools.partial(protocol, listener=listener),
        "timeout_keep_alive": limits.keep_alive_timeout,
        "h11_max_incomplete_event_size": limits.max_request_head_bytes,
        # no WebSockets: the service has none, and an upgraded connection would leave these limits
        "ws": "none",
    }


def ensure_open_files(needed: int) -> None:
    """Raise this process's soft limit on open files to `needed` (workers inherit it).

    Raises SettingsError when the hard limit is lower: connections beyond it would fail to be
    accepted at all, devices included, which is what `max_connections` is there to prevent.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SettingsError(
            f"setting 'max_connections': {needed - FD_RESERVE} connections and {FD_RESERVE} other files need "
            f"{needed} open files, but this process may open only {hard}: lower max_connections, or raise "
            f"the limit (LimitNOFILE= in the systemd unit, ulimit -n)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
