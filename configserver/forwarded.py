"""What the connection tells us about the client: certificate facts and the client's address.

Behind a TLS terminator the facts arrive as request headers, which count only when the TCP
peer is a trusted proxy (or a unix socket, whose access the folder permissions control). With
the built-in listener they arrive through the ASGI TLS extension and headers count for nothing.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .refusals import DUPLICATE_HEADER, UNTRUSTED_PROXY, Refused

VERIFY = b"x-ssl-client-verify"
SUBJECT_DN = b"x-ssl-client-s-dn"
ISSUER_DN = b"x-ssl-client-i-dn"
CERT = b"x-ssl-client-cert"
IDENTITY_HEADERS = (VERIFY, SUBJECT_DN, ISSUER_DN, CERT)
PROXY_SECRET = b"x-configserver-proxy-secret"
_FORWARDED_FOR = b"x-forwarded-for"
_REAL_IP = b"x-real-ip"

# The headers read, by what they hold.
_IDENTITY, _SECRET, _CHAIN, _ADDRESS = "identity", "secret", "forwarded for", "real ip"
_READ = {**dict.fromkeys(IDENTITY_HEADERS, _IDENTITY), PROXY_SECRET: _SECRET, _FORWARDED_FOR: _CHAIN,
         _REAL_IP: _ADDRESS}

# What terminators send for "nothing here": Apache `(null)`, HAProxy an empty value.
_ABSENT = ("", "(null)")


@dataclass(frozen=True, slots=True)
class ClientFacts:
    """The client-certificate facts of one request, as its transport reported them."""

    verify: str | None       # "SUCCESS" when the terminator (or our handshake) verified the chain
    subject_dn: str | None
    issuer_dn: str | None
    cert: str | None         # the certificate, in whatever encoding the terminator used
    client_ip: str | None

    @property
    def empty(self) -> bool:
        return self.verify is None and self.subject_dn is None and self.issuer_dn is None and self.cert is None


class TrustedProxies:
    """Who may hand us client-certificate headers: TCP peers in these networks (answers cached
    per address) or on the unix socket, and, with a `secret`, only requests that carry it."""

    def __init__(
        self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network], secret: str | None = None,
    ) -> None:
        self._networks = tuple(networks)
        self._known: dict[str, bool] = {}
        self.secret = secret.encode("latin-1") if secret else None

    def __contains__(self, host: str) -> bool:
        known = self._known.get(host)
        if known is None:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                return False
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            known = any(address in net for net in self._networks)
            if len(self._known) < 4096:
                self._known[host] = known
        return known


def peer_ip(scope: dict[str, Any]) -> str | None:
    """The TCP peer's address; None on a unix socket."""
    client = scope.get("client")
    return client[0] if client else None


def facts_from_tls(scope: dict[str, Any]) -> ClientFacts:
    """Facts from the built-in listener: the handshake verified the certificate already."""
    client_ip = peer_ip(scope)
    tls = scope.get("extensions", {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    if not chain:
        return ClientFacts(None, None, None, None, client_ip)
    verify = "SUCCESS" if tls.get("client_cert_error") is None else f"FAILED:{tls['client_cert_error']}"
    return ClientFacts(verify, None, None, chain[0], client_ip)


def facts_from_headers(scope: dict[str, Any], trusted: TrustedProxies) -> ClientFacts:
    """Facts a TLS terminator forwarded as headers.

    Raises Refused("untrusted proxy") when the peer is not a trusted proxy, whatever it sent, or
    lacks the proxy secret when one is set; and Refused("duplicate header") when an identity header arrives more than once: a
    terminator that appends instead of replacing would let a client smuggle its value in first.
    """
    client = scope.get("client")
    if client:
        peer = client[0]
        if peer not in trusted:
            raise Refused(UNTRUSTED_PROXY, f"peer {peer}")
    elif not _is_unix_socket(scope):
        raise Refused(UNTRUSTED_PROXY, "peer address unknown")
    else:
        peer = None

    seen: dict[bytes, str] = {}
    twice: bytes | None = None
    secrets: list[bytes] = []
    forwarded_for: list[str] = []
    real_ip: str | None = None
    for name, value in scope["headers"]:
        # ASGI servers give lower-case names; one lookup skips every header we do not read
        kind = _READ.get(name)
        if kind is None:
            continue
        if kind is _IDENTITY:
            if name in seen:
                twice = twice or name
            seen[name] = value.decode("latin-1").strip()
        elif kind is _SECRET:
            secrets.append(value.strip())
        elif kind is _CHAIN:
            forwarded_for.extend(part.strip() for part in value.decode("latin-1").split(","))
        else:
            real_ip = value.decode("latin-1").strip()
    if trusted.secret is not None:
        if len(secrets) > 1:  # a terminator that appends instead of replacing: say so
            raise Refused(DUPLICATE_HEADER, PROXY_SECRET.decode())
        if not secrets or not hmac.compare_digest(secrets[0], trusted.secret):
            raise Refused(UNTRUSTED_PROXY, "proxy secret missing or wrong")
    # Terminators append to what the client sent: only the right-most entry is theirs.
    client_ip = (forwarded_for[-1] if forwarded_for and forwarded_for[-1] else None) or real_ip or peer
    if twice is not None:   # the trusted terminator named the client: the security log names it too
        raise Refused(DUPLICATE_HEADER, twice.decode(), client_ip=client_ip)
    return ClientFacts(
        verify=seen.get(VERIFY),
        subject_dn=_present(seen.get(SUBJECT_DN)),
        issuer_dn=_present(seen.get(ISSUER_DN)),
        cert=_present(seen.get(CERT)),
        client_ip=client_ip,
    )


def _present(value: str | None) -> str | None:
    return None if value is None or value in _ABSENT else value


def _is_unix_socket(scope: dict[str, Any]) -> bool:
    server = scope.get("server")
    return bool(server) and server[1] is None
