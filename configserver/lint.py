"""`configserver check`: what would go wrong for some device, found before any device polls.

The folders are read the way the service reads them (one snapshot), then checked:

* every template file: syntax, and the includes, imports and extends that name no file;
* `{# configserver: ... #}` options and `# configserver: every poll above` markers;
* groups: a malformed table, models no innovaphone device has, templates for no group;
* template and vars files that no device will ever get or read, devices.csv rows naming no device;
* the template each device the folders name gets, rendered with that device's vars, and each
  model and group template rendered for a synthetic device of the model: undefined variables,
  missing includes, anything a template raises;
* scripts applied once whose applied part differs from one poll to the next (the device would
  apply it, and perhaps reset, on every poll), or that carry a `check` line of their own.

Each problem names a file and line, so admins can run the check in their own CI.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import jinja2
from jinja2 import nodes

from .app import RequestInfo
from .apply_once import EVERY_POLL_MARKER, OptionsError, TemplateOptions, apply_once, line_of, parse_options
from .identity import INNOVAPHONE_OUI, DeviceIdentity, InvalidDeviceName, normalize_mac, parse_device_name
from .preview import device_names
from .settings import Settings
from .templates import TEMPLATE_SUFFIX, ConfigurationError, SourceFile, TemplateStore, device_key

# Model names from the class lists of innovaphone's own update server (config.xml, build 2033).
# A model missing here can still be used: any file that names it (say vars/models/<model>.toml)
# makes it known to the check.
INNOVAPHONE_MODELS = frozenset(
    """
    ip101 ip102 ip110 ip110a ip111 ip112 ip150 ip150a ip152 ip153 ip154 ip200a ip200b ip222
    ip222a ip230 ip230a ip232 ip240 ip240a ip241 ip242 ip72 swphone mypbxi mypbxa
    ipva ipvadect ip0010 ip0011 ip0013 ip1060 ip1130 ip1200 ip1201 ip1202 ip2000 ip22 ip24 ip28
    ip29 ip29-2 ip29-4 ip3000 ip3010 ip3011 ip302 ip305 ip311 ip38 ip4001 ip400 ip411 ip6000
    ip6010 ip6012 ip6013 ip800 ip810 ip811 ipbs ipbs2 pbl
    """.split()
)

# A device of a model no file names, for a default template no named device reaches.
_ANY_MODEL_DEVICE = "LINT-00-00-00"
_OWN_CHECK_LINE = re.compile(r"^[ \t]*mod[ \t]+cmd[ \t]+UP1[ \t]+check\b", re.IGNORECASE | re.MULTILINE)
_LOOKS_LIKE_MARKER = re.compile(r"\s*#\s*configserver\b", re.IGNORECASE)
_OPTIONS_COMMENT = re.compile(r"\{#-?\s*configserver:")
_TOML_LINE = re.compile(r"at line (\d+)")
_VARS_LAYOUT = "vars files are default.toml, models/<model>.toml, devices/<hwid or MAC>.toml and devices.csv"
_NOW = dt.datetime(2030, 1, 15, 10, 30, tzinfo=dt.timezone.utc)
_LATER = _NOW + dt.timedelta(days=1, hours=3, minutes=7, seconds=11)


@dataclass(frozen=True, order=True)
class Problem:
    """One problem: the file (as the settings name its folder), the line, what is wrong."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


def check(settings: Settings, config_file: Path | None = None) -> list[Problem]:
    """Check the templates and vars folders of `settings`; return the problems, sorted.

    `config_file` is named in problems with the `groups` setting. Files being written right now
    are read as they are: the check has no earlier version to fall back to.
    """
    if not Path(settings.templates).is_dir():
        where = str(config_file) if config_file else "settings"
        return [Problem(where, 1, f"templates: {settings.templates} is not a folder (setting 'templates')")]
    store = TemplateStore(
        settings.templates, settings.vars, grace_seconds=0, cn_fixes=settings.cn_fixes,
        groups=settings.groups, apply_once=settings.apply_once, final_command=settings.final_command,
    )
    store.refresh()
    return _Check(store, settings, config_file).run()


@dataclass(frozen=True)
class _Job:
    """One template rendered for one device, with what that device would render it with."""

    template: str
    device: DeviceIdentity
    variables: Mapping[str, object]
    apply_once: bool
    label: str


class _Check:
    def __init__(self, store: TemplateStore, settings: Settings, config_file: Path | None) -> None:
        self.store, self.snapshot, self.settings = store, store.snapshot, settings
        self.fixes = store.snapshot.fixes
        self.config_label = str(config_file) if config_file else "settings"
        self.config_text = config_file.read_text(errors="replace") if config_file and config_file.is_file() else ""
        self.found: dict[tuple[str, int, str], list[str]] = {}
        self.named = device_names(self.snapshot, self.fixes)
        self.file_models = self._models_named_by_files()
        self.known_models = INNOVAPHONE_MODELS | set(self.file_models)

    def run(self) -> list[Problem]:
        self.templates()
        self.groups()
        self.vars()
        self.render_all()
        problems = []
        for (file, line, message), devices in self.found.items():
            if devices:
                more = f" and {len(devices) - 1} more" if len(devices) > 1 else ""
                message = f"{message} (for {devices[0]}{more})"
            problems.append(Problem(file, line, message))
        return sorted(problems)

    def add(self, file: str, line: int | None, message: str, device: str | None = None) -> None:
        key = (file, line or 1, message)
        if key in self.found and not self.found[key]:
            return   # found without rendering (a syntax error): true for every device
        devices = self.found.setdefault(key, [])
        if device and device not in devices:
            devices.append(device)

    def template_file(self, name: str) -> str:
        return str(Path(self.settings.templates) / name)

    def vars_file(self, name: str) -> str:
        return str(Path(self.settings.vars) / name)

    # -- template files ---------------------------------------------------------------------

    def templates(self) -> None:
        lookup_names = set(self.snapshot.lookup.values())
        for name, source in sorted(self.snapshot.templates.items()):
            file = self.template_file(name)
            if source.error:
                self.add(file, 1, source.error)
                continue
            self._syntax(name, source)
            self._markers(file, source.text)
            if name in lookup_names:
                try:
                    parse_options(source.text)
                except OptionsError as error:
                    self.add(file, error.line, error.message)
            elif match := _OPTIONS_COMMENT.search(source.text):
                self.add(file, line_of(source.text, match.start()), "options here are ignored: only the template "
                         "a device is given (devices/, models/, groups/, default.j2) has options")
            self._lookup_place(name)

    def _syntax(self, name: str, source: SourceFile) -> None:
        environment = self.store.environment
        try:
            tree = environment.parse(source.text, name, str(self.store.templates_dir / name))
            environment.compile(tree, name, str(self.store.templates_dir / name))
        except jinja2.TemplateSyntaxError as error:
            self.add(self.template_file(error.name or name), error.lineno, f"syntax error: {error.message}")
            return
        for node in tree.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
            target = node.template
            if getattr(node, "ignore_missing", False) or not isinstance(target, nodes.Const):
                continue
            if isinstance(target.value, str) and target.value not in self.snapshot.templates:
                self.add(self.template_file(name), node.lineno, f"template not found: {target.value}")

    def _markers(self, file: str, text: str) -> None:
        seen = False
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip() == EVERY_POLL_MARKER:
                if seen:
                    self.add(file, number, "a second every-poll marker: only the first one counts")
                seen = True
            elif _LOOKS_LIKE_MARKER.match(line):
                self.add(file, number, f"not the every-poll marker, which reads exactly {EVERY_POLL_MARKER!r}")

    def _lookup_place(self, name: str) -> None:
        """Files in devices/, models/ and groups/ that no device will ever get."""
        if not name.endswith(TEMPLATE_SUFFIX) or name.count("/") != 1:
            return
        folder, stem = name[: -len(TEMPLATE_SUFFIX)].split("/")
        file = self.template_file(name)
        if folder == "devices":
            self._device_file(file, stem, self.snapshot.lookup, name, "template")
        elif folder == "models":
            self._model_file(file, stem, f"models/{stem}{TEMPLATE_SUFFIX}")
            self._duplicate(file, self.snapshot.lookup.get(f"models/{stem.casefold()}"), name, "template")
        elif folder == "groups":
            if stem.casefold() not in {group.casefold() for group in self.snapshot.groups}:
                self.add(file, 1, f"no group {stem!r} in the groups table: no device gets this template")
            self._duplicate(file, self.snapshot.lookup.get(f"groups/{stem.casefold()}"), name, "template")

    def _device_file(self, file: str, stem: str, lookup: Mapping[str, str], name: str, kind: str) -> None:
        mac = normalize_mac(stem)
        if mac is not None and not mac.startswith(INNOVAPHONE_OUI):
            self.add(file, 1, f"{mac} is no innovaphone MAC (they start {INNOVAPHONE_OUI}): no device gets this {kind}")
            return
        if mac is None:
            try:
                parse_device_name(stem, self.fixes)
            except InvalidDeviceName:
                self.add(file, 1, f"{stem!r} is neither a hwid (<model>-xx-xx-xx) nor a MAC: no device gets this {kind}")
                return
        self._duplicate(file, lookup.get(f"devices/{device_key(stem, self.fixes)}"), name, kind)

    def _model_file(self, file: str, stem: str, wanted: str) -> None:
        if stem in self.fixes:
            fixed = wanted.replace(stem, self.fixes[stem], 1)
            self.add(file, 1, f"{stem} devices are served as {self.fixes[stem]}: name this file {fixed}")

    def _duplicate(self, file: str, used: str | None, name: str, kind: str) -> None:
        if used is not None and used != name:
            self.add(file, 1, f"ignored: {used} is the {kind} for the same devices")

    # -- groups -----------------------------------------------------------------------------

    def groups(self) -> None:
        default = self.snapshot.vars.get("default.toml")
        default_text = default.text if default is not None else ""
        if self.snapshot.groups_problem:
            self.add(self.vars_file("default.toml"), _find_line(default_text, r"^\s*\[?\s*groups\b"),
                     "groups must be a table of group = [model, ...]")
        for group, models in self.snapshot.groups.items():
            for model in models:
                if model in self.settings.groups.get(group, ()):
                    file, text = self.config_label, self.config_text
                else:
                    file, text = self.vars_file("default.toml"), default_text
                line = _find_line(text, rf"""["']{re.escape(model)}["']""")
                if model in self.fixes:
                    fixed = self.fixes[model]
                    self.add(file, line, f"group {group}: {model} devices are served as {fixed}: list {fixed}")
                elif model.casefold() not in self.known_models:
                    self.add(file, line,
                             f"group {group}: {model!r} is no innovaphone model this check knows, and no file names it")

    def _models_named_by_files(self) -> dict[str, str]:
        """Models that device and model files name: casefolded -> as first spelled."""
        models: dict[str, str] = {}
        for hwids in self.named.values():
            for hwid in sorted(hwids):
                model = hwid.rsplit("-", 3)[0]
                models.setdefault(model.casefold(), model)
        for folder, suffix in ((self.snapshot.templates, TEMPLATE_SUFFIX), (self.snapshot.vars, ".toml")):
            for name in sorted(folder):
                if name.startswith("models/") and name.endswith(suffix) and name.count("/") == 1:
                    model = name[len("models/"):-len(suffix)]
                    models.setdefault(model.casefold(), model)
        return models

    # -- vars files -------------------------------------------------------------------------

    def vars(self) -> None:
        for name, source in sorted(self.snapshot.vars.items()):
            file = self.vars_file(name)
            if source.error:
                match = _TOML_LINE.search(source.error)
                self.add(file, int(match[1]) if match else 1, source.error)
                continue
            if name == "devices.csv":
                self._csv(file, source.text)
            elif not name.endswith(".toml"):
                self.add(file, 1, f"no device reads this file: {_VARS_LAYOUT}")
            elif name != "default.toml":
                folder, _, stem = name[: -len(".toml")].partition("/")
                if folder == "devices" and stem and "/" not in stem:
                    self._device_file(file, stem, self.snapshot.vars_lookup, name, "vars file")
                elif folder == "models" and stem and "/" not in stem:
                    self._model_file(file, stem, f"models/{stem}.toml")
                    self._duplicate(file, self.snapshot.vars_lookup.get(f"models/{stem.casefold()}"), name, "vars file")
                else:
                    self.add(file, 1, f"no device reads this file: {_VARS_LAYOUT}")

    def _csv(self, file: str, text: str) -> None:
        reader = csv.reader(io.StringIO(text))
        header = next(reader, [])
        if "hwid" not in header and "mac" not in header:
            self.add(file, 1, "no hwid or mac column: no row names a device")
            return
        seen: dict[str, int] = {}
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            line = reader.line_num
            values = dict(zip(header, row))
            hwid, mac = (values.get("hwid") or "").strip(), (values.get("mac") or "").strip()
            device = self._csv_device(file, line, hwid, mac)
            if device is None:
                continue
            if device in seen:
                self.add(file, line, f"names the same device as line {seen[device]}, whose values this row replaces")
            seen[device] = line

    def _csv_device(self, file: str, line: int, hwid: str, mac: str) -> str | None:
        by_mac = normalize_mac(mac) if mac else None
        if mac and by_mac is None:
            self.add(file, line, f"mac {mac!r} is not a MAC")
        elif by_mac is not None and not by_mac.startswith(INNOVAPHONE_OUI):
            self.add(file, line, f"mac {mac} is no innovaphone MAC (they start {INNOVAPHONE_OUI})")
            by_mac = None
        if hwid:
            try:
                parsed = parse_device_name(hwid, self.fixes)
            except InvalidDeviceName:
                self.add(file, line, f"hwid {hwid!r} is not <model>-xx-xx-xx: the row names no device")
                return None
            if by_mac is not None and by_mac != parsed.mac:
                self.add(file, line, f"hwid {hwid} and mac {mac} are different devices: only the hwid counts")
            return device_key(hwid, self.fixes)
        if not mac:
            self.add(file, line, "neither hwid nor mac: the row names no device")
        return by_mac

    # -- rendering --------------------------------------------------------------------------

    def render_all(self) -> None:
        rendered: set[tuple[str, str]] = set()
        for job in self._jobs():
            if (job.template, job.device.hwid) not in rendered:
                rendered.add((job.template, job.device.hwid))
                self._render(job)

    def _jobs(self) -> Iterator[_Job]:
        snapshot = self.snapshot
        default, default_reached = snapshot.lookup.get("default"), False
        for device, label, synthetic in self._devices():
            choice = snapshot.choose(device)
            if choice.template is None or choice.problem:
                continue   # no template is a 404 by design; a broken vars file is reported above
            device = dataclasses.replace(device, groups=choice.groups)
            default_reached |= choice.template == default
            yield _Job(choice.template, device, choice.variables, choice.apply_once, label)
            for group in choice.groups if synthetic else ():   # each group template, for each of its models
                template = snapshot.lookup.get(f"groups/{group.casefold()}")
                if template and template != choice.template:
                    options = snapshot.options.get(template, TemplateOptions())
                    apply = snapshot.apply_once if options.apply_once is None else options.apply_once
                    yield _Job(template, device, choice.variables, apply, label)
        if default and not default_reached:
            device = self._identity(_ANY_MODEL_DEVICE)
            choice = snapshot.choose(device)
            if not choice.problem:
                yield _Job(default, device, choice.variables, choice.apply_once,
                           f"synthetic device {_ANY_MODEL_DEVICE} of a model no file names")

    def _devices(self) -> Iterator[tuple[DeviceIdentity, str, bool]]:
        """The devices the folders name, then a synthetic device of each model: (device, label, synthetic)."""
        for mac, hwids in sorted(self.named.items()):
            for hwid in sorted(hwids):
                yield self._identity(hwid), hwid, False
            if not hwids and f"devices/{mac}" in self.snapshot.lookup:
                # model unknown: only its MAC template can be chosen. The MAC stands in for the
                # hwid, which chooses the same files and keeps each such device apart.
                yield DeviceIdentity(mac, "", mac, mac, "configserver check"), f"{mac}, model unknown", False
        models = dict(self.file_models)
        for members in self.snapshot.groups.values():
            for model in members:
                models.setdefault(model.casefold(), model)
        for _, model in sorted(models.items()):
            if model in self.fixes:
                continue
            try:
                device = self._identity(f"{model}-00-00-00")
            except InvalidDeviceName:
                continue
            yield device, f"synthetic device {device.hwid}", True

    def _identity(self, name: str) -> DeviceIdentity:
        parsed = parse_device_name(name, self.fixes)
        return DeviceIdentity(parsed.hwid, parsed.model, parsed.mac, cn=name, issuer="configserver check")

    def _render(self, job: _Job) -> None:
        scripts = []
        for now, check in ((_NOW, ""), (_LATER, "0123456789abcdef0123456789abcdef")):
            device = job.device
            query = {"sn": device.mac.replace("-", ""), "hwid": device.hwid, "type": device.model,
                     "ip": "192.0.2.10", "ver": "13r3 sr1 [13.4711/134711/500]", "PROT": "13.4711", "BOOT": "134711",
                     "CHECK": check}
            context = {"device": device, "vars": job.variables, "request": RequestInfo("/", query, "192.0.2.10"), "now": now}
            try:
                scripts.append(self.store.render(job.template, context))
            except ConfigurationError as error:
                self.add(self.template_file(error.file or job.template), error.line, error.cause, job.label)
                return
        if not job.apply_once:
            return
        source = self.snapshot.templates[job.template].text
        if apply_once(scripts[0], None).digest != apply_once(scripts[1], None).digest:
            self.add(self.template_file(job.template), 1,
                     "the part applied once changes from poll to poll (does it use now or request?): "
                     f"the device would apply it on every poll; move such lines above {EVERY_POLL_MARKER!r}", job.label)
        if _OWN_CHECK_LINE.search(scripts[0]):
            match = _OWN_CHECK_LINE.search(source)
            self.add(self.template_file(job.template), line_of(source, match.start()) if match else 1,
                     "a check line of its own while configserver applies the script once: "
                     "remove it, or turn that off with {# configserver: apply_once=false #}", job.label)


def _find_line(text: str, pattern: str) -> int:
    match = re.search(pattern, text, re.MULTILINE)
    return line_of(text, match.start()) if match else 1
