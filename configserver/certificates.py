"""Forwarded client certificates: decoding the four encodings terminators use, and verifying.

Encodings seen on the wire (../shared/docs/terminators.md):
- URL-escaped PEM: nginx `$ssl_client_escaped_cert`, lighttpd through mod_magnet, Apache `escape:`
- PEM with every newline turned into a space: Apache `%{SSL_CLIENT_CERT}s`
- one line of base64 DER: HAProxy `ssl_c_der,base64`
- plain PEM: the ASGI TLS extension of the built-in listener
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from .errors import ConfigserverError
from .names import DistinguishedName

# One marker line of a PEM file. No part of it can match across the marker's end, so finding
# every marker is one pass over the file; pairing them is a second (see pem_blocks).
_PEM_MARKER = re.compile(rb"-----(BEGIN|END) ([A-Z0-9 ]{1,64})-----")
_MAX_ENCODED = 16384


@dataclass(frozen=True)
class PemBlock:
    """One `-----BEGIN LABEL-----` ... `-----END LABEL-----` block of a PEM file."""

    label: str  # CERTIFICATE, PRIVATE KEY, ...
    text: bytes  # the block itself, both marker lines included: what a PEM loader takes
    body: bytes  # what lies between the marker lines (base64, perhaps headers)


def pem_blocks(data: bytes) -> list[PemBlock]:
    """The PEM blocks in `data`, in file order, in time linear in its length.

    A block is a BEGIN marker whose next marker is the END of the same label; a BEGIN that is not
    closed that way is no block (PEM blocks do not nest). The lazy pattern this replaces,
    `BEGIN (L)(.*?)END \\1`, searched to the end of the file from every unclosed BEGIN: a few
    megabytes of BEGIN lines kept `check-cas` and `trust-value` busy for minutes.
    """
    blocks: list[PemBlock] = []
    opened: re.Match[bytes] | None = None
    for marker in _PEM_MARKER.finditer(data):
        if marker[1] == b"BEGIN":
            opened = marker
        elif opened is not None and marker[2] == opened[2]:
            blocks.append(PemBlock(opened[2].decode("ascii"), data[opened.start() : marker.end()],
                                   data[opened.end() : marker.start()]))
            opened = None
        else:
            opened = None
    return blocks


class CertificateError(ConfigserverError, ValueError):
    """A forwarded certificate cannot be decoded or does not verify; the text says why."""


class CABundleError(ConfigserverError, ValueError):
    """The CA bundle file is unreadable or holds no CA certificate."""


def decode_forwarded_cert(value: str) -> x509.Certificate:
    """Decode a certificate in any of the encodings terminators forward.

    Raises CertificateError when the value is empty, `(null)`, or not one certificate.
    """
    text = value.strip()
    if not text or text == "(null)":
        raise CertificateError("no certificate in the header")
    if len(text) > _MAX_ENCODED:
        raise CertificateError("certificate header too large")
    if "%" in text:
        # not unquote_plus: Apache's escape: keeps '+' literal, and '+' is base64
        text = urllib.parse.unquote(text)
    bodies = [block.body.decode() for block in pem_blocks(text.encode()) if block.label == "CERTIFICATE"]
    if len(bodies) > 1:
        raise CertificateError("more than one certificate in the header")
    body = bodies[0] if bodies else text
    try:
        der = base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise CertificateError("certificate is neither PEM nor base64 DER") from None
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise CertificateError(f"not an X.509 certificate: {exc}") from None
    readable_names(cert)
    return cert


def readable_names(cert: x509.Certificate) -> tuple[x509.Name, x509.Name]:
    """The certificate's subject and issuer. Raises CertificateError when either cannot be read.

    cryptography parses names only when asked: a certificate whose subject holds a UTF8String that
    is not UTF-8 loads, then raises ValueError on `.subject`. Asked here once, it is refused as
    what it is, not a server error on every poll.
    """
    names = []
    for part in ("subject", "issuer"):
        try:
            names.append(getattr(cert, part))
        except ValueError:
            raise CertificateError(
                f"the certificate's {part} cannot be read: a name in it is not valid text (e.g. bad UTF-8)"
            ) from None
    return names[0], names[1]


def load_ca_bundle(path: Path) -> list[x509.Certificate]:
    """Read the PEM bundle of accepted device CAs.

    Raises CABundleError when the file cannot be read, is not PEM, or holds no CA certificate.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CABundleError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CABundleError(f"{path} holds no PEM certificate") from None
    cas = [c for c in certs if _is_ca(c)]
    if not cas:
        raise CABundleError(f"{path} holds no CA certificate (basicConstraints CA:TRUE)")
    return cas


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        # X.509 v1 roots (old CAs) carry no extensions at all; a self-signed v1 is a root.
        return cert.version == x509.Version.v1 and cert.issuer == cert.subject


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether `ca`'s key made `cert`'s signature.

    Checked by hand rather than with `verify_directly_issued_by`, which refuses SHA-1: early
    device certificates are SHA-1-signed, and whether to admit them is the TLS terminator's
    decision (its security level), not ours. MD5 stays refused.
    """
    try:
        algorithm = cert.signature_hash_algorithm
        if algorithm is None or isinstance(algorithm, hashes.MD5):
            return False
        key = ca.public_key()
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
        else:
            cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


@dataclass(frozen=True)
class CheckedCert:
    """A decoded certificate, the facts we keep, and whether our CA bundle vouches for it."""

    subject: DistinguishedName
    issuer: DistinguishedName
    fingerprint_sha256: str
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    signature_problem: str | None  # None: signed by a CA in the bundle

    def problem(self, now: dt.datetime) -> str | None:
        """Why this certificate must not be trusted at `now`, or None when it may."""
        if self.signature_problem:
            return self.signature_problem
        if now < self.not_before:
            return "certificate not yet valid"
        if now > self.not_after:
            return "certificate expired"
        return None


class CertificateVerifier:
    """Decodes forwarded certificates and checks their signature against the CA bundle.

    Callers remember the verdict (admission.Gate does, per set of forwarded facts): devices
    poll every few minutes with the same certificate, and bad certificates are remembered too,
    so a client cannot make us redo signature checks by repeating one. Only validity against
    the clock is evaluated per poll (`CheckedCert.problem`).
    """

    def __init__(self, cas: list[x509.Certificate] | None) -> None:
        self._cas = cas

    def check(self, encoded: str) -> CheckedCert:
        """Decode a forwarded certificate and check its signature.

        Raises CertificateError when the value is not one decodable certificate.
        """
        cert = decode_forwarded_cert(encoded)
        not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
        problem: str | None = "not signed by any CA in ca_bundle"
        if self._cas is None:
            problem = "no ca_bundle configured: a forwarded certificate cannot be verified"
        for ca in self._cas or ():
            if ca.subject != cert.issuer:
                continue
            if not _signed_by(cert, ca):
                continue  # e.g. a forged CA with the same name: try the next one, then refuse
            problem = None
            not_before = max(not_before, ca.not_valid_before_utc)
            not_after = min(not_after, ca.not_valid_after_utc)
            break
        return CheckedCert(
            subject=DistinguishedName.from_x509(cert.subject),
            issuer=DistinguishedName.from_x509(cert.issuer),
            fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
            serial=format(cert.serial_number, "x"),
            not_before=not_before,
            not_after=not_after,
            signature_problem=problem,
        )
