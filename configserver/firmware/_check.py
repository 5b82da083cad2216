"""What `configserver check` finds in the `[firmware]` tables, for every device it knows.

* a table that cannot be read (a bad build, URL form, window, rollout...);
* a build given in a model or device file for a model that takes none of that kind;
* a model innovaphone's update server does not know: its file name would be a guess;
* a file missing from the firmware folder (`folder`), which the device would fail to fetch;
* a firmware URL a device cannot reach (loopback);
* a group or first device of a rollout that names nothing;
* a template that writes a `times` line of its own while a window is declared;
* `fast_poll` or `allow` for a template not applied once (its devices never look provisioned);
* a rollout whose every wave is open already: a target changed under it goes to all at once.
"""

from __future__ import annotations

import datetime as dt
import re
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..identity import (
    DeviceIdentity,
    InvalidDeviceName,
    normalize_mac,
    parse_device_name,
)
from ..innovaphone import MODELS, firmware_file_name
from ._decision import takes
from ._declaration import KINDS, FirmwareError
from ._stage import FirmwareStage, firmware_layers

_TIMES_LINE = re.compile(r"^[ \t]*mod[ \t]+cmd[ \t]+UP1[ \t]+times?\b", re.IGNORECASE | re.MULTILINE)
_KEY_IN_MESSAGE = re.compile(r"firmware\.([A-Za-z_.\-\[\]0-9]+)")


@dataclass(frozen=True, order=True)
class FirmwareProblem:
    """One problem: the vars file (relative to the vars folder), its line, what, for which device."""

    file: str
    line: int
    message: str
    device: str


def check_firmware(
    snapshot: Any, devices: Iterable[tuple[DeviceIdentity, str]], now: dt.datetime | None = None,
) -> Iterator[FirmwareProblem]:
    """The firmware problems of `snapshot` (a content snapshot) for `devices` ((device, label)),
    as of `now` (default: the clock)."""
    now = now or dt.datetime.now(dt.UTC)
    stage = FirmwareStage()
    for device, label in devices:
        choice = snapshot.choose(device)
        if choice.problem:
            continue   # a vars file that cannot be read is reported by the check itself
        try:
            declaration = stage.declaration(snapshot, choice)
        except FirmwareError as error:
            file, _, message = str(error).partition(": ")
            yield FirmwareProblem(file, _line_of_key(snapshot, file, message), message, label)
            continue
        model = device.model
        yield from _taken(snapshot, choice.vars_files, model, label)
        if declaration.window.allow is not None or declaration.window.initial is not None:
            template = snapshot.templates.get(choice.template or "")
            if template is not None and _TIMES_LINE.search(template.text):
                where = _first_file_with(snapshot, choice.vars_files, "allow") or \
                    _first_file_with(snapshot, choice.vars_files, "initial") or "default.toml"
                yield FirmwareProblem(where, _line_of(snapshot, where, "allow"), (
                    f"a window is declared here and templates/{choice.template} writes a times line of its "
                    "own: the device would get two; keep one"), label)
        if not choice.apply_once and (declaration.fast_poll is not None or declaration.window.allow is not None):
            # such a device never reports CHECK: the server cannot tell when it is first provisioned
            key = "fast_poll" if declaration.fast_poll is not None else "allow"
            where = _first_file_with(snapshot, choice.vars_files, key) or "default.toml"
            effect = ("it is never sent" if key == "fast_poll"
                      else "the window holds for its first provisioning too (no /allow lifted)")
            yield FirmwareProblem(where, _line_of(snapshot, where, key), (
                f"firmware.{key}: templates/{choice.template} is not applied once (apply_once off), so its "
                f"devices never report CHECK and are never seen being provisioned: {effect}; "
                "apply it once, or drop the key"), label)
        if not declaration.targets or not model:
            continue
        source = _first_file_with(snapshot, choice.vars_files, "url") or "default.toml"
        if model.casefold() not in MODELS:
            kinds = [kind for kind in declaration.targets if takes(model, kind)]
            names = ", ".join(firmware_file_name(model, kind) for kind in kinds)
            yield FirmwareProblem(source, _line_of(snapshot, source, "url"), (
                f"model {model} is not one innovaphone's update server knows: its file names ({names}) "
                "are a guess; check them"), label)
        host = urllib.parse.urlsplit(declaration.url or "").hostname or ""
        if host == "localhost" or host.startswith("127.") or host == "::1":
            yield FirmwareProblem(source, _line_of(snapshot, source, "url"),
                                  f"firmware.url {declaration.url} points at loopback: a device would call itself", label)
        if declaration.folder:
            folder_source = _first_file_with(snapshot, choice.vars_files, "folder") or source
            for kind, build in declaration.targets.items():
                if not takes(model, kind):
                    continue
                path = Path(declaration.folder) / build / firmware_file_name(model, kind)
                if not path.is_file():
                    yield FirmwareProblem(folder_source, _line_of(snapshot, folder_source, "folder"), (
                        f"{path} is missing: {device.model} devices would be sent "
                        f"{declaration.url}{build}/{path.name} and fail to fetch it"), label)
        rollout = declaration.rollout
        if rollout is not None and rollout.start is not None and rollout.waves:
            last = rollout.start + rollout.waves[-1].after
            if last <= now:
                # start is when this target's rollout begins: a target changed under an old start
                # would open every wave at once. A finished rollout's table says nothing more.
                where = _first_file_with(snapshot, choice.vars_files, "rollout") or source
                yield FirmwareProblem(where, _line_of(snapshot, where, "start"), (
                    f"firmware.rollout.start {rollout.start.isoformat()}: every wave is open already (the last "
                    f"since {last.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC), so a target changed now reaches all its devices "
                    "at once. For a new build, move start to when its rollout begins; once a rollout is through, "
                    "drop its start, first and waves"), label)
        if rollout is not None:
            groups = {name.casefold() for name in snapshot.groups}
            for name in sorted(rollout.first):
                if name in groups or normalize_mac(name):
                    continue
                try:
                    parse_device_name(name)
                except InvalidDeviceName:
                    where = _first_file_with(snapshot, choice.vars_files, "rollout") or source
                    yield FirmwareProblem(where, _line_of(snapshot, where, "first"), (
                        f"firmware.rollout.first: {name!r} is no group, hwid or MAC: it names no device"), label)


def _taken(snapshot: Any, vars_files: tuple[str, ...], model: str, label: str) -> Iterator[FirmwareProblem]:
    """A build named in a model's or device's own file for a model that takes none of it."""
    for name, table in firmware_layers(snapshot, vars_files):
        if name == "default.toml" or not isinstance(table, Mapping):
            continue
        for kind in KINDS:
            if table.get(kind) not in (None, False) and model and not takes(model, kind):
                what = "firmware" if kind == "prot" else "boot code"
                yield FirmwareProblem(name, _line_of(snapshot, name, kind), (
                    f"firmware.{kind}: {model} takes no {what} updates (innovaphone's list): "
                    "this build is never sent; remove it"), label)


def _first_file_with(snapshot: Any, vars_files: tuple[str, ...], key: str) -> str | None:
    """The most specific of `vars_files` whose `[firmware]` table sets `key`."""
    found = None
    for name, table in firmware_layers(snapshot, vars_files):
        if isinstance(table, Mapping) and key in table:
            found = name
    return found


def _line_of(snapshot: Any, file: str, key: str) -> int:
    source = snapshot.vars.get(file)
    text = source.text if source is not None else ""
    match = re.search(rf"^\s*{re.escape(key)}\s*=", text, re.MULTILINE)
    if match is None:
        match = re.search(r"^\s*\[\s*firmware\b", text, re.MULTILINE)
    return text.count("\n", 0, match.start()) + 1 if match else 1


def _line_of_key(snapshot: Any, file: str, message: str) -> int:
    found = _KEY_IN_MESSAGE.search(message)
    key = found.group(1).split(".")[-1].split("[")[0] if found else "firmware"
    return _line_of(snapshot, file, key)
