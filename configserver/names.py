"""Distinguished names in the three string forms TLS terminators produce, parsed and compared.

- legacy (HAProxy, Apache's LegacyDNStringFormat, nginx `_legacy`): `/C=DE/O=innovaphone/CN=IP232-30-00-af`
- RFC 2253 / 4514 (Apache, nginx), leaf-most RDN first: `CN=IP232-30-00-af,O=innovaphone,C=DE`
- OpenSSL oneline (lighttpd): `C = DE, O = innovaphone, CN = IP232-30-00-af`

All three parse into one `DistinguishedName`, with RDNs in X.500 order (root first), so that two
names are compared as attribute sequences, never as strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from cryptography import x509
from cryptography.x509.oid import NameOID

from .errors import ConfigserverError


class DNError(ConfigserverError, ValueError):
    """The text is not a distinguished name in any of the forms we know."""


# Short names as OpenSSL prints them, keyed by upper-cased spelling (and long-name aliases).
_SHORT_NAMES = {
    "C": "C", "COUNTRYNAME": "C",
    "ST": "ST", "S": "ST", "STATEORPROVINCENAME": "ST",
    "L": "L", "LOCALITYNAME": "L",
    "O": "O", "ORGANIZATIONNAME": "O",
    "OU": "OU", "ORGANIZATIONALUNITNAME": "OU",
    "CN": "CN", "COMMONNAME": "CN",
    "STREET": "STREET", "STREETADDRESS": "STREET",
    "DC": "DC", "DOMAINCOMPONENT": "DC",
    "UID": "UID", "USERID": "UID",
    "SN": "SN", "SURNAME": "SN",
    "GN": "GN", "GIVENNAME": "GN",
    "SERIALNUMBER": "serialNumber",
    "EMAILADDRESS": "emailAddress", "EMAIL": "emailAddress", "E": "emailAddress",
    "TITLE": "title",
}

_OID_SHORT = {
    NameOID.COUNTRY_NAME.dotted_string: "C",
    NameOID.STATE_OR_PROVINCE_NAME.dotted_string: "ST",
    NameOID.LOCALITY_NAME.dotted_string: "L",
    NameOID.ORGANIZATION_NAME.dotted_string: "O",
    NameOID.ORGANIZATIONAL_UNIT_NAME.dotted_string: "OU",
    NameOID.COMMON_NAME.dotted_string: "CN",
    NameOID.STREET_ADDRESS.dotted_string: "STREET",
    NameOID.DOMAIN_COMPONENT.dotted_string: "DC",
    NameOID.USER_ID.dotted_string: "UID",
    NameOID.SURNAME.dotted_string: "SN",
    NameOID.GIVEN_NAME.dotted_string: "GN",
    NameOID.SERIAL_NUMBER.dotted_string: "serialNumber",
    NameOID.EMAIL_ADDRESS.dotted_string: "emailAddress",
    NameOID.TITLE.dotted_string: "title",
}

_OID_TEXT = re.compile(r"(?:OID\.)?([0-2](?:\.[0-9]+)+)\Z", re.ASCII | re.IGNORECASE)
_ATTR_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9-]*\Z|(?:OID\.)?[0-2](?:\.[0-9]+)+\Z", re.ASCII)
_ONELINE_START = re.compile(r"\s*[A-Za-z0-9.]+ = ", re.ASCII)
_LEGACY_SPLIT = re.compile(r"/(?=[A-Za-z][A-Za-z0-9.]*=)", re.ASCII)
_LEGACY_HEX = re.compile(r"\\x([0-9A-Fa-f]{2})")

Attribute = tuple[str, str]
RDN = tuple[Attribute, ...]


def _attribute_type(text: str) -> str:
    name = text.strip()
    if not _ATTR_TYPE.match(name):
        raise DNError(f"bad attribute type {name!r}")
    oid = _OID_TEXT.match(name)
    if oid:
        return _OID_SHORT.get(oid.group(1), oid.group(1))
    return _SHORT_NAMES.get(name.upper(), name.upper())


@dataclass(frozen=True)
class DistinguishedName:
    """A DN as a sequence of RDNs, root first; each RDN a sorted tuple of (type, value)."""

    rdns: tuple[RDN, ...]

    def values(self, attribute: str) -> list[str]:
        """Every value of `attribute` (a short name such as "CN"), in order."""
        return [value for rdn in self.rdns for kind, value in rdn if kind == attribute]

    def __str__(self) -> str:
        return self.rfc4514

    @cached_property
    def rfc4514(self) -> str:
        """RFC 4514 form, leaf first, for logs and templates."""
        return ",".join("+".join(f"{k}={_escape_4514(v)}" for k, v in rdn) for rdn in reversed(self.rdns))

    @classmethod
    def from_x509(cls, name: x509.Name) -> "DistinguishedName":
        """The DN of a certificate's subject or issuer."""
        rdns = []
        for rdn in name.rdns:
            attrs = []
            for attr in rdn:
                dotted = attr.oid.dotted_string
                value = attr.value if isinstance(attr.value, str) else attr.value.hex()
                attrs.append((_OID_SHORT.get(dotted, dotted), value))
            rdns.append(tuple(sorted(attrs)))
        return cls(tuple(rdns))


def _escape_4514(value: str) -> str:
    out = re.sub(r'([,+"\\<>;=])', r"\\\1", value)
    if out.startswith((" ", "#")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def parse_dn(text: str) -> DistinguishedName:
    """Parse a DN in legacy, RFC 2253/4514 or OpenSSL oneline form.

    Raises DNError for anything else, including an empty string.
    """
    if not text or not text.strip():
        raise DNError("empty distinguished name")
    if "\n" in text or "\r" in text or "\x00" in text:
        raise DNError("control characters in distinguished name")
    if text.startswith("/"):
        return _parse_legacy(text)
    if _ONELINE_START.match(text):
        return _parse_oneline(text)
    return _parse_rfc4514(text)


def _parse_legacy(text: str) -> DistinguishedName:
    # `/` inside a value is not escaped in this form, so a `/` only starts an RDN when an
    # attribute type and `=` follow it. OpenSSL escapes bytes outside ASCII as \xHH (UTF-8).
    parts = _LEGACY_SPLIT.split(text[1:])
    rdns = []
    for part in parts:
        attrs = []
        # multi-valued RDNs are joined with '+' in this form
        for piece in re.split(r"\+(?=[A-Za-z][A-Za-z0-9.]*=)", part):
            kind, sep, value = piece.partition("=")
            if not sep:
                raise DNError(f"{piece!r} has no '='")
            attrs.append((_attribute_type(kind), _unescape_legacy(value)))
        rdns.append(tuple(sorted(attrs)))
    return DistinguishedName(tuple(rdns))


def _unescape_legacy(value: str) -> str:
    if "\\x" not in value:
        return value
    raw = bytearray()
    pos = 0
    for match in _LEGACY_HEX.finditer(value):
        raw += value[pos:match.start()].encode()
        raw.append(int(match.group(1), 16))
        pos = match.end()
    raw += value[pos:].encode()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DNError("bad \\x escape sequence in distinguished name") from None


def _split_unescaped(text: str, separators: str, *, quotes: bool) -> list[tuple[str, str]]:
    """Split on unescaped separator characters; returns (piece, separator-that-ended-it)."""
    out: list[tuple[str, str]] = []
    current: list[str] = []
    i, quoted = 0, False
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            current.append(text[i:i + 2])
            i += 2
            continue
        if ch == "\\":
            raise DNError("distinguished name ends in a lone backslash")
        if quotes and ch == '"':
            quoted = not quoted
        elif ch in separators and not quoted:
            out.append(("".join(current), ch))
            current = []
            i += 1
            continue
        current.append(ch)
        i += 1
    if quoted:
        raise DNError("unterminated quote in distinguished name")
    out.append(("".join(current), ""))
    return out


def _unescape_value(raw: str, *, quotes: bool) -> str:
    """RFC 4514 value unescaping: `\\,` style escapes, `\\HH` UTF-8 bytes, `#hex` BER."""
    value = raw.strip(" ")
    # an escaped trailing space survives the strip above only if we put it back
    if raw.rstrip(" ") != raw and raw.rstrip(" ").endswith("\\"):
        value = raw.rstrip(" ") + " "
    if quotes and len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        value = value[1:-1]
    if value.startswith("#"):
        return value  # BER-encoded value: compared as its text
    out = bytearray()
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\":
            nxt = value[i + 1:i + 3]
            if len(nxt) == 2 and all(c in "0123456789abcdefABCDEF" for c in nxt):
                out.append(int(nxt, 16))
                i += 3
                continue
            if i + 1 >= len(value):
                raise DNError("distinguished name ends in a lone backslash")
            out += value[i + 1].encode()
            i += 2
            continue
        out += ch.encode()
        i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise DNError("bad \\HH escape sequence in distinguished name") from None


def _parse_rdn_list(text: str, *, quotes: bool) -> list[RDN]:
    rdns: list[RDN] = []
    attrs: list[Attribute] = []
    for piece, sep in _split_unescaped(text, ",;+", quotes=quotes):
        kind, eq, value = piece.partition("=")
        if not eq:
            raise DNError(f"{piece.strip()!r} has no '='")
        attrs.append((_attribute_type(kind), _unescape_value(value, quotes=quotes)))
        if sep != "+":
            rdns.append(tuple(sorted(attrs)))
            attrs = []
    return rdns


def _parse_rfc4514(text: str) -> DistinguishedName:
    return DistinguishedName(tuple(reversed(_parse_rdn_list(text, quotes=False))))


def _parse_oneline(text: str) -> DistinguishedName:
    # OpenSSL's XN_FLAG_ONELINE: forward order, " = " and ", " and " + ", values with
    # special characters in double quotes instead of backslash escapes.
    return DistinguishedName(tuple(_parse_rdn_list(text, quotes=True)))
