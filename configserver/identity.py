"""From a certificate's common name to a device: the name pattern, broken early CNs, hwid, MAC.

An innovaphone device certificate's CN is `<model>-xx-xx-xx`: the model, then the last three
bytes of the device's MAC, whose OUI is innovaphone's 00-90-33. Nothing that fails this pattern
ever reaches the file system.
"""

from __future__ import annotations

import datetime as dt
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import ConfigserverError
from .innovaphone import BROKEN_MODEL_NAMES, INNOVAPHONE_OUI

# re.ASCII: \d and friends must not admit Unicode digits or look-alikes; fullmatch with \Z-like
# semantics: no trailing newline slips through.
_DEVICE_NAME = re.compile(
    r"(?P<model>[A-Za-z0-9]{1,24}(?:-[A-Za-z0-9]{1,8})?)"
    r"-(?P<b1>[0-9A-Fa-f]{2})-(?P<b2>[0-9A-Fa-f]{2})-(?P<b3>[0-9A-Fa-f]{2})",
    re.ASCII,
)
_MAC = re.compile(r"(?:[0-9A-Fa-f]{2}[-:]?){5}[0-9A-Fa-f]{2}", re.ASCII)
_NORMAL_MAC = re.compile(r"[0-9a-f]{2}(?:-[0-9a-f]{2}){5}", re.ASCII)


class InvalidDeviceName(ConfigserverError, ValueError):
    """The name is not `<model>-xx-xx-xx`."""


@dataclass(frozen=True)
class DeviceName:
    """The parts of a device name, with broken early model names fixed."""

    hwid: str        # "IP222-30-00-af": fixed model, lower-case hex
    model: str       # "IP222"
    mac: str         # "00-90-33-30-00-af"


def parse_device_name(name: str, fixes: Mapping[str, str] = BROKEN_MODEL_NAMES) -> DeviceName:
    """Split a CN (or a hwid from a URL) into hwid, model and MAC, fixing broken model names.

    Raises InvalidDeviceName when `name` is not exactly `<model>-xx-xx-xx`.
    """
    match = _DEVICE_NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise InvalidDeviceName(f"{name!r} is not <model>-xx-xx-xx")
    model = match["model"]
    model = sys.intern(fixes.get(model, model))   # a fleet has a few models: one string each
    tail = f"{match['b1']}-{match['b2']}-{match['b3']}".lower()
    return DeviceName(hwid=f"{model}-{tail}", model=model, mac=f"{INNOVAPHONE_OUI}-{tail}")


def normalize_mac(text: str) -> str | None:
    """`0090333000AF`, `00:90:33:30:00:af` or `00-90-33-30-00-af` as `00-90-33-30-00-af`; None if not a MAC."""
    # A MAC already in this form (every device's own, on every audit row) is returned as it is:
    # a quarter of a microsecond, and no memo of a whole fleet's MACs to hold
    if _NORMAL_MAC.fullmatch(text):
        return text
    if not _MAC.fullmatch(text):
        return None
    d = text.replace("-", "").replace(":", "").lower()
    return f"{d[0:2]}-{d[2:4]}-{d[4:6]}-{d[6:8]}-{d[8:10]}-{d[10:12]}"


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """Who is polling, as proven by its certificate. This is `device` in templates."""

    hwid: str
    model: str
    mac: str
    cn: str                                  # the CN as presented, before any fix
    issuer: str                              # the accepted CA that issued it (RFC 4514)
    fingerprint_sha256: str | None = None    # when the certificate itself is known
    serial: str | None = None                # hex
    not_after: dt.datetime | None = None
    groups: tuple[str, ...] = field(default=())

    @property
    def mac_plain(self) -> str:
        """The MAC as innovaphone's `sn` argument carries it: `0090333000af`."""
        return self.mac.replace("-", "")


def query_names_other_device(
    device: DeviceIdentity, query: Mapping[str, list[str]], fixes: Mapping[str, str] = BROKEN_MODEL_NAMES
) -> str | None:
    """Whether the device's query names another device, the way innovaphone's server compares.

    `hwid` is compared after the CN fix, `sn` and `mac` without dashes or colons, keys and values
    without regard to case. Returns a description of the first mismatch, or None. Empty values name
    nothing (a URL whose placeholder the device left empty).
    """
    # Keys without regard to case: `HWID=` or `SN=` must not name another device unnoticed.
    for key, values in query.items():
        name = key.lower()
        if name == "hwid":
            for value in values:
                if not value:
                    continue
                try:
                    claimed = parse_device_name(value, fixes).hwid
                except InvalidDeviceName:
                    claimed = value
                if claimed.lower() != device.hwid.lower():
                    return f"{key}={value}"
        elif name in ("sn", "mac"):
            for value in values:
                if value and re.sub(r"[-:]", "", value).lower() != device.mac_plain:
                    return f"{key}={value}"
    return None
