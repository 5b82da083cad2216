"""Which device, model or group a file is for: the rules that turn names into lookup keys.

One rule for every file name in templates/ and vars/, and one for every row of devices.csv,
used alike by the server, `configserver render` and `configserver check`. Pure functions.

Lookup keys: `default`, `models/<model>`, `groups/<group>` (templates only) and
`devices/<mac or hwid>`, all casefolded; a per-device file may be named by the hwid (any case,
broken early model names fixed) or by the MAC (dashes, colons or none).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..identity import InvalidDeviceName, normalize_mac, parse_device_name
from ..innovaphone import BROKEN_MODEL_NAMES, INNOVAPHONE_OUI

TEMPLATE_SUFFIX = ".j2"
VARS_SUFFIX = ".toml"
DEVICES_CSV = "devices.csv"


def device_file_key(stem: str, fixes: Mapping[str, str] = BROKEN_MODEL_NAMES) -> str:
    """The key of a per-device name (a file's stem, a CSV cell): a MAC or a hwid, casefolded.

    A name that is neither keeps its casefolded self: it matches no device, and `check` says so.
    """
    mac = normalize_mac(stem)
    if mac:
        return mac
    try:
        return parse_device_name(stem, fixes).hwid.casefold()
    except InvalidDeviceName:
        return stem.casefold()


def lookup_key(name: str, suffix: str, fixes: Mapping[str, str] = BROKEN_MODEL_NAMES) -> str | None:
    """The lookup key of the file `name` (relative, with '/'), or None if no device reads it.

    `suffix` is TEMPLATE_SUFFIX or VARS_SUFFIX; groups/ exists for templates only.
    """
    if not name.endswith(suffix):
        return None
    stem = name[: -len(suffix)]
    if stem == "default":
        return "default"
    folder, _, rest = stem.partition("/")
    if not rest or "/" in rest:
        return None
    if folder == "devices":
        return f"devices/{device_file_key(rest, fixes)}"
    if folder == "models":
        return f"models/{rest.casefold()}"
    if folder == "groups" and suffix == TEMPLATE_SUFFIX:
        return f"groups/{rest.casefold()}"
    return None


@dataclass(frozen=True, slots=True)
class RowDevice:
    """The device a devices.csv row names: its lookup key, and what `check` should say about it."""

    key: str | None          # None: the row names no device
    problem: str | None      # the admin's mistake in this row, if any
    hwid: str | None = None  # the hwid the row names, fixed, when it names one


def csv_row_device(hwid: str | None, mac: str | None, fixes: Mapping[str, str] = BROKEN_MODEL_NAMES) -> RowDevice:
    """The one devices.csv rule: a row names its device by `hwid`, or, when that cell is blank,
    by `mac`. A hwid that is not `<model>-xx-xx-xx` names nothing; a MAC outside innovaphone's
    OUI names nothing; when both are given and disagree, the hwid counts.
    """
    hwid, mac = (hwid or "").strip(), (mac or "").strip()
    by_mac = normalize_mac(mac) if mac else None
    mac_problem = None
    if mac and by_mac is None:
        mac_problem = f"mac {mac!r} is not a MAC"
    elif by_mac is not None and not by_mac.startswith(INNOVAPHONE_OUI):
        mac_problem = f"mac {mac} is no innovaphone MAC (they start {INNOVAPHONE_OUI})"
        by_mac = None
    if hwid:
        try:
            parsed = parse_device_name(hwid, fixes)
        except InvalidDeviceName:
            return RowDevice(None, f"hwid {hwid!r} is not <model>-xx-xx-xx: the row names no device")
        if mac_problem is None and by_mac is not None and by_mac != parsed.mac:
            mac_problem = f"hwid {hwid} and mac {mac} are different devices: only the hwid counts"
        return RowDevice(parsed.hwid.casefold(), mac_problem, parsed.hwid)
    if not mac:
        return RowDevice(None, "neither hwid nor mac: the row names no device")
    return RowDevice(by_mac, mac_problem)
