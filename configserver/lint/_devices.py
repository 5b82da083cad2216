"""The devices the check renders for: those the folders name, and one synthetic device of each
model that a file or the groups table names."""

from __future__ import annotations

from collections.abc import Iterator

from ..identity import DeviceIdentity, InvalidDeviceName, parse_device_name
from ._findings import Findings

ISSUER = "configserver check"


def devices(found: Findings) -> Iterator[tuple[DeviceIdentity, str, bool]]:
    """(device, label for problems, synthetic?), named devices first."""
    for mac, hwids in sorted(found.named.items()):
        for hwid in sorted(hwids):
            yield identity(found, hwid), hwid, False
        if not hwids and f"devices/{mac}" in found.snapshot.lookup:
            # model unknown: only its MAC template can be chosen. The MAC stands in for the
            # hwid, which chooses the same files and keeps each such device apart.
            yield DeviceIdentity(mac, "", mac, mac, ISSUER), f"{mac}, model unknown", False
    models = dict(found.file_models)
    for members in found.snapshot.groups.values():
        for model in members:
            models.setdefault(model.casefold(), model)
    for _, model in sorted(models.items()):
        if model in found.fixes:
            continue
        try:
            device = identity(found, f"{model}-00-00-00")
        except InvalidDeviceName:
            continue
        yield device, f"synthetic device {device.hwid}", True


def identity(found: Findings, name: str) -> DeviceIdentity:
    """The device a hwid names, as the check presents it to the pipeline. Raises InvalidDeviceName."""
    parsed = parse_device_name(name, found.fixes)
    return DeviceIdentity(parsed.hwid, parsed.model, parsed.mac, cn=name, issuer=ISSUER)
