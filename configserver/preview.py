"""What a device would get now, without the device or its certificate: `configserver render`.

The answer comes from the poll pipeline itself (poll.py), with an admission that names the
device instead of reading a certificate: the same query check, choice, rendering and wrap, so
a preview is the real answer by construction.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .admission import NamedDevice
from .content import (
    DEVICES_CSV,
    TEMPLATE_SUFFIX,
    VARS_SUFFIX,
    Choice,
    Snapshot,
    csv_row_device,
)
from .errors import ConfigserverError
from .firmware import FirmwareStage, KnownHalts
from .identity import (
    DeviceIdentity,
    InvalidDeviceName,
    normalize_mac,
    parse_device_name,
)
from .innovaphone import INNOVAPHONE_OUI
from .outcome import Outcome
from .poll import PollRequest, query_arguments
from .service import Service

PREVIEW_ISSUER = "none (configserver render: no certificate)"


class UnresolvedDevice(ConfigserverError):
    """The name given is no device, or a MAC whose model no file tells; the text says what to give."""


@dataclass(frozen=True)
class Preview:
    """A device's answer as the service would send it now, and how it was chosen."""

    device: DeviceIdentity
    choice: Choice
    record: Outcome
    note: str | None = None      # what the preview had to assume

    @property
    def body(self) -> bytes:
        return self.record.body

    def headers(self) -> list[str]:
        """The decision, one `key: value` line each: device, template, vars files, digest..."""
        record, choice, device = self.record, self.choice, self.device
        groups = ", ".join(choice.groups) or "none"
        hwid, model = device.hwid or "(hwid unknown)", device.model or "unknown"
        lines = [f"device: {hwid} (model {model}, MAC {device.mac}, groups: {groups})"]
        if self.note:
            lines.append(f"note: {self.note}")
        lines.append(f"status: {record.status}" + (f" {record.reason}" if record.reason else ""))
        if record.detail:
            lines.append(f"detail: {record.detail}")
        if record.status == 403:
            return lines
        lines.append(f"template: {choice.template or 'none'}")
        lines.append(f"vars: {', '.join(choice.vars_files) or 'none'}")
        if record.status == 200:
            if choice.apply_once:
                lines.append(f"apply once: on, final command {choice.final_command}")
                lines.append(f"digest: {record.check_digest}")
                reported = "not given" if record.check_reported is None else repr(record.check_reported)
                lines.append(f"decision: {record.decision} (CHECK {reported})")
            else:
                lines.append("apply once: off")
        return lines


def device_names(snapshot: Snapshot, fixes: Mapping[str, str]) -> dict[str, set[str]]:
    """Every device the folders name, by MAC: the hwids named for it (empty when only its MAC is).

    Names come from files in templates/devices and vars/devices, and from the rows of devices.csv.
    """
    found: dict[str, set[str]] = {}

    def note(name: str) -> None:
        mac = normalize_mac(name)
        if mac is not None:
            if mac.startswith(INNOVAPHONE_OUI):
                found.setdefault(mac, set())
            return
        try:
            parsed = parse_device_name(name, fixes)
        except InvalidDeviceName:
            return
        found.setdefault(parsed.mac, set()).add(parsed.hwid)

    for folder, suffix in ((snapshot.templates, TEMPLATE_SUFFIX), (snapshot.vars, VARS_SUFFIX)):
        for name in folder:
            if name.startswith("devices/") and name.endswith(suffix) and name.count("/") == 1:
                note(name[len("devices/"):-len(suffix)])
    table = snapshot.vars.get(DEVICES_CSV)
    for row in table.data.rows() if table is not None and table.data is not None else []:
        named = csv_row_device(row.get("hwid"), row.get("mac"), fixes)
        if named.hwid is not None:
            note(named.hwid)
        elif named.key is not None:
            note(named.key)
    return found


def resolve_device(name: str, snapshot: Snapshot, fixes: Mapping[str, str]) -> tuple[DeviceIdentity, str | None]:
    """The device `name` (a hwid or a MAC) stands for, and a note when something had to be assumed.

    A MAC is resolved through the hwid a file names for it. Without one, only a template named
    by the MAC can be chosen: the device is then rendered with an empty model and hwid, and the
    note says so. Raises UnresolvedDevice when neither works.
    """
    try:
        parsed = parse_device_name(name, fixes)
    except InvalidDeviceName:
        parsed = None
    if parsed is not None:
        return DeviceIdentity(parsed.hwid, parsed.model, parsed.mac, cn=name, issuer=PREVIEW_ISSUER), None
    mac = normalize_mac(name)
    if mac is None:
        raise UnresolvedDevice(f"{name!r} is neither a hwid (<model>-xx-xx-xx, e.g. IP232-30-00-af) nor a MAC")
    if not mac.startswith(INNOVAPHONE_OUI):
        raise UnresolvedDevice(f"{mac} is not an innovaphone MAC (they start {INNOVAPHONE_OUI})")
    tail = mac[len(INNOVAPHONE_OUI) + 1:]
    hwids = sorted(device_names(snapshot, fixes).get(mac, ()))
    if len(hwids) == 1:
        parsed = parse_device_name(hwids[0], fixes)
        device = DeviceIdentity(parsed.hwid, parsed.model, parsed.mac, cn=parsed.hwid, issuer=PREVIEW_ISSUER)
        return device, f"hwid {parsed.hwid} found for MAC {mac} in the file names"
    if len(hwids) > 1:
        raise UnresolvedDevice(f"files name several devices with MAC {mac} ({', '.join(hwids)}): give the hwid")
    template = snapshot.lookup.get(f"devices/{mac}")
    if template is None:
        raise UnresolvedDevice(
            f"cannot tell which device {mac} is: no template is named by this MAC and no file names its hwid, "
            f"and model, group and default templates depend on the model: give the hwid (<model>-{tail})"
        )
    note = (
        f"model unknown (no file names the hwid of {mac}): device.model and device.hwid are empty and "
        f"model vars and groups are left out; give the hwid (<model>-{tail}) for the exact script"
    )
    return DeviceIdentity("", "", mac, cn=mac, issuer=PREVIEW_ISSUER), note


def preview(
    service: Service, name: str, path: str = "/", query: Iterable[tuple[str, str]] = (), now: dt.datetime | None = None,
    halts: Callable[[], frozenset[tuple[str, str, str]]] | None = None,
) -> Preview:
    """What the device `name` would get now when polling `path` with `query` added.

    `path` may carry a query of its own (`/update?type=IP232`). `halts` reads the halted
    firmware targets (as RolloutState.refresh() does), whose files a poll is not sent; called
    only when the device has a firmware target. None: the pipeline's own firmware stage
    decides. Raises UnresolvedDevice.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    snapshot = service.store.snapshot
    device, note = resolve_device(name, snapshot, service.fixes)
    path, _, query_string = path.partition("?")
    args = query_arguments(query_string, query)
    request = PollRequest("GET", path or "/", args, None, None, now.timestamp(), time.perf_counter())
    admission = NamedDevice(device, service.fixes, service.revoked.current())
    firmware = FirmwareStage(KnownHalts(halts)) if halts is not None else None
    outcome = service.pipeline.with_admission(admission, firmware).answer(request, now)
    return Preview(device, snapshot.choose(device), outcome, note)
