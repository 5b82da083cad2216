"""File names that no device will ever get or read: a per-device name that is no device, a
broken model name, two files for the same devices."""

from __future__ import annotations

from collections.abc import Mapping

from ..content import device_file_key
from ..identity import InvalidDeviceName, normalize_mac, parse_device_name
from ..innovaphone import INNOVAPHONE_OUI
from ._findings import Findings


def device_file(found: Findings, file: str, stem: str, lookup: Mapping[str, str], name: str, kind: str) -> None:
    """A file in devices/ (template or vars, `kind`) whose stem names no device, or a device
    another file already serves."""
    mac = normalize_mac(stem)
    if mac is not None and not mac.startswith(INNOVAPHONE_OUI):
        found.add(file, 1, f"{mac} is no innovaphone MAC (they start {INNOVAPHONE_OUI}): no device gets this {kind}")
        return
    if mac is None:
        try:
            parse_device_name(stem, found.fixes)
        except InvalidDeviceName:
            found.add(file, 1, f"{stem!r} is neither a hwid (<model>-xx-xx-xx) nor a MAC: no device gets this {kind}")
            return
    duplicate(found, file, lookup.get(f"devices/{device_file_key(stem, found.fixes)}"), name, kind)


def model_file(found: Findings, file: str, stem: str, wanted: str) -> None:
    """A file in models/ named by a broken early model name, which devices are never served as."""
    if stem in found.fixes:
        fixed = wanted.replace(stem, found.fixes[stem], 1)
        found.add(file, 1, f"{stem} devices are served as {found.fixes[stem]}: name this file {fixed}")


def duplicate(found: Findings, file: str, used: str | None, name: str, kind: str) -> None:
    """`name` is ignored because `used` serves the same devices."""
    if used is not None and used != name:
        found.add(file, 1, f"ignored: {used} is the {kind} for the same devices")
