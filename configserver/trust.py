"""The value of a my.innovaphone project's Trust property for our server certificate.

It is the certificate's DER, hex-encoded in lower case (the form of `vars create X509/... pb <hex>`),
optionally prefixed with the list of properties the redirection service should hand the device
and a colon: `type,ip:<hex>`, or `*:<hex>` for all of them.
"""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from .certificates import pem_blocks
from .errors import ConfigserverError

_PROPERTY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


class TrustValueError(ConfigserverError, ValueError):
    """The file or the property list cannot give a Trust value; the text says why."""


def trust_value(data: bytes, properties: str | None = None) -> str:
    """The Trust value for the one certificate in `data` (PEM or DER).

    `properties` is a comma-separated list of property names, or `*`. Raises TrustValueError for
    a file with no certificate, with several, or with a private key, and for a malformed list.
    """
    der = certificate_der(data)
    if properties is None:
        return der.hex()
    return f"{property_list(properties)}:{der.hex()}"


def property_list(text: str) -> str:
    """`type, ip` as `type,ip`; `*` as is. Raises TrustValueError for anything else."""
    if text.strip() == "*":
        return "*"
    names = [name.strip() for name in text.split(",")]
    bad = [name for name in names if not _PROPERTY.fullmatch(name)]
    if bad:
        raise TrustValueError(f"properties: {bad[0]!r} is no property name; give names like type,ip or *")
    return ",".join(names)


def certificate_der(data: bytes) -> bytes:
    """The DER of the single certificate in `data`, a PEM file or a DER certificate."""
    blocks = pem_blocks(data)
    if any("PRIVATE KEY" in block.label for block in blocks) or (not blocks and _is_der_private_key(data)):
        raise TrustValueError("the file holds a private key: give the certificate alone, and keep the key private")
    if not blocks:
        try:
            return x509.load_der_x509_certificate(data).public_bytes(serialization.Encoding.DER)
        except ValueError:
            raise TrustValueError("the file holds no certificate (neither PEM nor DER)") from None
    certificates = [block for block in blocks if block.label == "CERTIFICATE"]
    if not certificates:
        labels = ", ".join(sorted({block.label for block in blocks}))
        raise TrustValueError(f"the file holds no certificate, only {labels}")
    if len(certificates) > 1:
        raise TrustValueError(
            f"the file holds {len(certificates)} certificates (a chain?): give the server certificate alone"
        )
    try:
        certificate = x509.load_pem_x509_certificate(certificates[0].text)
    except ValueError as exc:
        raise TrustValueError(f"the certificate cannot be read: {exc}") from None
    return certificate.public_bytes(serialization.Encoding.DER)


def _is_der_private_key(data: bytes) -> bool:
    try:
        serialization.load_der_private_key(data, password=None)
    except TypeError:
        return True      # encrypted: a key all the same
    except (ValueError, UnsupportedAlgorithm):
        return False
    return True
