"""A device's own account of itself, from the XML that `mod cmd X509 xml-info` and
`mod cmd CMD0 xml-info` print, uploaded with the extended `scfg` form.

What is known of these documents comes from innovaphone's own update server (innovaphone.md
1.11): `X509 xml-info` is `<info>` with `servercert/certificate` elements carrying `subject_cn`,
`issuer_cn`, `not_before` and `not_after`, `requests/request` while a signing request waits, and
`busy` while one is made; `CMD0 xml-info` is `<info>` whose `name` attribute is the device's
name. A `version` like box_info.xml's (`<sys version="label[prot] ... [boot] ... [hw]">`) gives
firmware, boot code and hardware. The device says all this about itself: it is kept as its word,
bounded in size, and never decides anything about trust.

The documents come from devices, so they are parsed with defusedxml (no entities, no DTDs).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from typing import Any

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from ..errors import ConfigserverError

_VALUE_CHARS = 256
_ATTRIBUTES = 64
_CERTIFICATES = 32
_DECLARATION = re.compile(r"^\s*<\?xml[^>]*\?>", re.IGNORECASE)
# innovaphone's own server reads a box's version the same way (getPbxInfo)
_VERSION = re.compile(r"(?P<label>.*?)\[(?P<prot>[^\]]*)\].*?\[(?P<boot>[^\]]*)\].*?\[(?P<hw>[^\]]*)\]")


class FactsUnreadable(ConfigserverError, ValueError):
    """The upload is not the XML document we asked for; the message never quotes it."""


@dataclass(frozen=True, slots=True)
class Certificate:
    """One certificate as the device lists it (`servercert/certificate`)."""

    subject_cn: str | None
    issuer_cn: str | None
    not_before: str | None
    not_after: str | None
    attributes: dict[str, str] = field(default_factory=dict)   # all of them, bounded


@dataclass(frozen=True, slots=True)
class CertificateFacts:
    """What `mod cmd X509 xml-info` says: the device's certificates and signing requests."""

    certificates: tuple[Certificate, ...]
    requests: int        # signing requests waiting on the device
    busy: bool           # a signing request is being made
    request_error: bool  # the last signing request failed

    def as_json(self) -> dict[str, Any]:
        """As JSON stores it (lists, not tuples)."""
        return {**asdict(self), "certificates": [asdict(c) for c in self.certificates]}


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What `mod cmd CMD0 xml-info` says: the device's name and versions."""

    name: str | None
    version: str | None
    firmware: str | None
    boot: str | None
    hardware: str | None
    attributes: dict[str, str] = field(default_factory=dict)   # of <info>, bounded

    def as_json(self) -> dict[str, Any]:
        """As JSON stores it."""
        return asdict(self)


def _clip(value: str) -> str:
    return value if len(value) <= _VALUE_CHARS else value[:_VALUE_CHARS] + "..."


def _attributes(element: ET.Element) -> dict[str, str]:
    return {_clip(key): _clip(value) for key, value in list(element.attrib.items())[:_ATTRIBUTES]}


def _info(text: str) -> ET.Element:
    """The `<info>` element of an upload. innovaphone's server wraps the output in an element of
    its own before parsing, so a fragment is accepted; an XML declaration is dropped first."""
    body = _DECLARATION.sub("", text, count=1)
    try:
        root = SafeET.fromstring(f"<upload>{body}</upload>")
    except DefusedXmlException as exc:
        raise FactsUnreadable(f"refused: {type(exc).__name__} (entities and DTDs are not accepted)") from None
    except ET.ParseError as exc:
        line, column = exc.position
        raise FactsUnreadable(f"not well-formed XML (line {line}, column {column})") from None
    info = root if root.tag == "info" else root.find("info")
    if info is None:
        raise FactsUnreadable("no <info> element")
    return info


def parse_certificate_facts(text: str) -> CertificateFacts:
    """Parse the output of `mod cmd X509 xml-info`. Raises FactsUnreadable."""
    info = _info(text)
    certificates = tuple(
        Certificate(
            subject_cn=_optional(element, "subject_cn"),
            issuer_cn=_optional(element, "issuer_cn"),
            not_before=_optional(element, "not_before"),
            not_after=_optional(element, "not_after"),
            attributes=_attributes(element),
        )
        for element in info.findall("servercert/certificate")[:_CERTIFICATES]
    )
    return CertificateFacts(
        certificates=certificates,
        requests=len(info.findall("requests/request")),
        busy=info.find("busy") is not None,
        request_error=info.find("request-error") is not None,
    )


def parse_device_facts(text: str) -> DeviceFacts:
    """Parse the output of `mod cmd CMD0 xml-info`. Raises FactsUnreadable."""
    info = _info(text)
    version = info.get("version")
    if version is None:
        sys = info.find(".//sys")
        version = sys.get("version") if sys is not None else None
    firmware = boot = hardware = None
    if version is not None:
        match = _VERSION.match(version)
        if match:
            firmware, boot, hardware = (_clip(match[name].strip()) or None for name in ("prot", "boot", "hw"))
    return DeviceFacts(
        name=_optional(info, "name"),
        version=_clip(version) if version is not None else None,
        firmware=firmware,
        boot=boot,
        hardware=hardware,
        attributes=_attributes(info),
    )


def _optional(element: ET.Element, name: str) -> str | None:
    value = element.get(name)
    return _clip(value) if value is not None else None
