"""The groups table, vars files and devices.csv rows."""

from __future__ import annotations

import csv
import io
import re

from ..content import DEVICES_CSV, VARS_SUFFIX, csv_row_device
from ..settings import environment_variable
from ._findings import Findings, find_line
from ._places import device_file, duplicate, model_file

_TOML_LINE = re.compile(r"at line (\d+)")
_VARS_LAYOUT = "vars files are default.toml, models/<model>.toml, devices/<hwid or MAC>.toml and devices.csv"


def check_groups(found: Findings) -> None:
    """A malformed table, and models no innovaphone device has or that are served under another name."""
    default = found.snapshot.vars.get("default.toml")
    default_text = default.text if default is not None else ""
    if found.snapshot.groups_problem:
        found.add(found.vars_file("default.toml"), find_line(default_text, r"^\s*\[?\s*groups\b"),
                  "groups must be a table of group = [model, ...]")
    for group, models in found.snapshot.groups.items():
        for model in models:
            if model in found.settings.groups.get(group, ()):
                file, text = environment_variable("groups") or found.config_label, found.config_text
            else:
                file, text = found.vars_file("default.toml"), default_text
            line = find_line(text, rf"""["']{re.escape(model)}["']""")
            if model in found.fixes:
                fixed = found.fixes[model]
                found.add(file, line, f"group {group}: {model} devices are served as {fixed}: list {fixed}")
            elif model.casefold() not in found.known_models:
                found.add(file, line,
                          f"group {group}: {model!r} is no innovaphone model this check knows, and no file names it")


def check_vars(found: Findings) -> None:
    """Vars files that cannot be read, that no device reads, and devices.csv rows."""
    for name, source in sorted(found.snapshot.vars.items()):
        file = found.vars_file(name)
        if source.error:
            match = _TOML_LINE.search(source.error)
            found.add(file, int(match[1]) if match else 1, source.error)
            continue
        if name == DEVICES_CSV:
            _csv(found, file, source.text)
        elif not name.endswith(VARS_SUFFIX):
            found.add(file, 1, f"no device reads this file: {_VARS_LAYOUT}")
        elif name != "default.toml":
            folder, _, stem = name[: -len(VARS_SUFFIX)].partition("/")
            if folder == "devices" and stem and "/" not in stem:
                device_file(found, file, stem, found.snapshot.vars_lookup, name, "vars file")
            elif folder == "models" and stem and "/" not in stem:
                model_file(found, file, stem, f"models/{stem}{VARS_SUFFIX}")
                duplicate(found, file, found.snapshot.vars_lookup.get(f"models/{stem.casefold()}"), name, "vars file")
            else:
                found.add(file, 1, f"no device reads this file: {_VARS_LAYOUT}")


def _csv(found: Findings, file: str, text: str) -> None:
    reader = csv.reader(io.StringIO(text))
    header = next(reader, [])
    if "hwid" not in header and "mac" not in header:
        found.add(file, 1, "no hwid or mac column: no row names a device")
        return
    seen: dict[str, int] = {}
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        line = reader.line_num
        values = dict(zip(header, row))
        named = csv_row_device(values.get("hwid"), values.get("mac"), found.fixes)
        if named.problem:
            found.add(file, line, named.problem)
        if named.key is None:
            continue
        if named.key in seen:
            found.add(file, line, f"names the same device as line {seen[named.key]}, whose values this row replaces")
        seen[named.key] = line
