"""The devices the check renders for: those the folders name (a device named by its MAC alone
as a device of each model it could be), and one synthetic device of each model that a file or
the groups table names."""

from __future__ import annotations

from collections.abc import Iterator

from ..identity import DeviceIdentity, InvalidDeviceName, parse_device_name
from ._findings import Findings

ISSUER = "configserver check"
# the model of a device the check makes up for a model no file names
ANY_MODEL = "LINT"


def devices(found: Findings) -> Iterator[tuple[DeviceIdentity, str, bool]]:
    """(device, label for problems, synthetic?), named devices first."""
    models = _models(found)
    for mac, hwids in sorted(found.named.items()):
        for hwid in sorted(hwids):
            yield identity(found, hwid), hwid, False
        if not hwids:
            yield from _known_by_mac(found, mac, models)
    for model in models:
        yield identity(found, f"{model}-00-00-00"), f"synthetic device {model}-00-00-00", True


def _models(found: Findings) -> list[str]:
    """The models that files or the groups table name, as first spelled, sorted; broken names
    (served under their fix) and names that make no hwid left out."""
    models = dict(found.file_models)
    for members in found.snapshot.groups.values():
        for model in members:
            models.setdefault(model.casefold(), model)
    usable = []
    for _, model in sorted(models.items()):
        try:
            identity(found, f"{model}-00-00-00")
        except InvalidDeviceName:
            continue
        if model not in found.fixes:
            usable.append(model)
    return usable


def _known_by_mac(found: Findings, mac: str, models: list[str]) -> Iterator[tuple[DeviceIdentity, str, bool]]:
    """A device the folders name by its MAC alone (a devices.csv row with no hwid, a vars file
    named by the MAC): its model is unknown until it polls. Its MAC template, when it has one,
    wins whatever the model; otherwise it is the device of each model the files name, and of a
    model none names (LINT), with its vars: each template and vars files it could get, once."""
    snapshot = found.snapshot
    if f"devices/{mac}" in snapshot.lookup:
        # the MAC stands in for the hwid, which chooses the same files and keeps each such device apart
        yield DeviceIdentity(mac, "", mac, mac, ISSUER), f"{mac}, model unknown", False
        return
    tail = mac.split("-", 3)[3]
    seen: set[tuple[str | None, tuple[str, ...]]] = set()
    for model in (*models, ANY_MODEL):
        device = identity(found, f"{model}-{tail}")
        choice = snapshot.choose(device)
        if (choice.template, choice.vars_files) not in seen:
            seen.add((choice.template, choice.vars_files))
            yield device, f"{mac}, model unknown, as {device.hwid}", False


def identity(found: Findings, name: str) -> DeviceIdentity:
    """The device a hwid names, as the check presents it to the pipeline. Raises InvalidDeviceName."""
    parsed = parse_device_name(name, found.fixes)
    return DeviceIdentity(parsed.hwid, parsed.model, parsed.mac, cn=name, issuer=ISSUER)
