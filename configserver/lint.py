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

from .apply_once import (
    EVERY_POLL_MARKER,
    OptionsError,
    apply_once,
    line_of,
    parse_options,
)
from .content import (
    DEVICES_CSV,
    TEMPLATE_SUFFIX,
    VARS_SUFFIX,
    Choice,
    ConfigurationError,
    ContentStore,
    SourceFile,
    csv_row_device,
    device_file_key,
)
from .firmware import check_firmware
from .identity import (
    DeviceIdentity,
    InvalidDeviceName,
    normalize_mac,
    parse_device_name,
)
from .innovaphone import INNOVAPHONE_OUI, MODELS
from .lab.workspace import LAB_PORT
from .poll import Pipeline, RequestInfo
from .preview import device_names
from .revocation import RevocationError, read_revocations
from .service import Service
from .settings import Settings, environment_variable

# A device of a model no file names, for a default template no named device reaches.
_ANY_MODEL_DEVICE = "LINT-00-00-00"
_FINGERPRINT_ENTRY = re.compile(r"\s*(?:[0-9a-fA-F]{2}:){31}[0-9a-fA-F]{2}\b|\s*[0-9a-fA-F]{64}\b")
_OWN_APPLY_LINE = re.compile(r"^[ \t]*config[ \t]+(?:write|activate)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://(?P<host>\[[0-9a-f:.]+\]|[^/:\s\[\]]+)(?::(?P<port>\d+))?[^\s]*", re.IGNORECASE)
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
        where = environment_variable("templates") or (str(config_file) if config_file else "settings")
        return [Problem(where, 1, f"templates: {settings.templates} is not a folder (setting 'templates')")]
    service = Service.from_settings(settings.model_copy(update={"revoked": None}), grace_seconds=0)
    service.store.refresh()
    return _Check(service.store, service.pipeline, settings, config_file).run()


@dataclass(frozen=True)
class _Job:
    """One template rendered for one device, with the choice that device would get for it."""

    choice: Choice
    device: DeviceIdentity
    label: str

    @property
    def template(self) -> str:
        return self.choice.template or ""


class _Check:
    def __init__(self, store: ContentStore, pipeline: Pipeline, settings: Settings, config_file: Path | None) -> None:
        self.store, self.snapshot, self.settings = store, store.snapshot, settings
        self.pipeline = pipeline
        self.fixes = store.snapshot.fixes
        self.config_label = str(config_file) if config_file else "settings"
        self.config_text = config_file.read_text(errors="replace") if config_file and config_file.is_file() else ""
        self.found: dict[tuple[str, int, str], list[str]] = {}
        self.named = device_names(self.snapshot, self.fixes)
        self.file_models = self._models_named_by_files()
        self.known_models = MODELS | set(self.file_models)

    def run(self) -> list[Problem]:
        self.templates()
        self.groups()
        self.vars()
        self.revoked()
        self.coverage()
        self.render_all()
        self.firmware()
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
        environment = self.pipeline.renderer.environment
        try:
            tree = environment.parse(source.text, name, str(self.store.templates_dir / name))
            environment.compile(tree, name, str(self.store.templates_dir / name))
        except jinja2.TemplateSyntaxError as error:
            self.add(self.template_file(error.name or name), error.lineno, f"syntax error: {error.message}")
            return
        except RecursionError:
            self.add(self.template_file(name), 1, "nested too deeply to be compiled: split it with include or macros")
            return
        except Exception as error:  # a constant Jinja folds at compile time, such as 2**10000000
            self.add(self.template_file(name), 1, f"cannot be compiled: {type(error).__name__}: {str(error)[:200]}")
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
        self._duplicate(file, lookup.get(f"devices/{device_file_key(stem, self.fixes)}"), name, kind)

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
                    file, text = environment_variable("groups") or self.config_label, self.config_text
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
            if name == DEVICES_CSV:
                self._csv(file, source.text)
            elif not name.endswith(VARS_SUFFIX):
                self.add(file, 1, f"no device reads this file: {_VARS_LAYOUT}")
            elif name != "default.toml":
                folder, _, stem = name[: -len(VARS_SUFFIX)].partition("/")
                if folder == "devices" and stem and "/" not in stem:
                    self._device_file(file, stem, self.snapshot.vars_lookup, name, "vars file")
                elif folder == "models" and stem and "/" not in stem:
                    self._model_file(file, stem, f"models/{stem}{VARS_SUFFIX}")
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
            named = csv_row_device(values.get("hwid"), values.get("mac"), self.fixes)
            if named.problem:
                self.add(file, line, named.problem)
            if named.key is None:
                continue
            if named.key in seen:
                self.add(file, line, f"names the same device as line {seen[named.key]}, whose values this row replaces")
            seen[named.key] = line

    # -- the revoked file --------------------------------------------------------------------

    def revoked(self) -> None:
        path = self.settings.revoked
        if path is None:
            return
        try:
            revocations = read_revocations(path, self.fixes)
        except RevocationError as error:
            self.add(str(path), 1, str(error).removeprefix(f"{path}: "))
            return
        for line, why in revocations.problems:
            self.add(str(path), line, why)
        if revocations.fingerprints and not (self.settings.require_client_cert or self.settings.builtin_tls):
            text = path.read_text(encoding="utf-8-sig")
            line = next((number for number, entry in enumerate(text.splitlines(), 1)
                         if _FINGERPRINT_ENTRY.match(entry)), 1)
            self.add(str(path), line, "a certificate fingerprint revokes only polls whose certificate reaches "
                     "the app: set require_client_cert (behind a terminator) or revoke the hwid or MAC")

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
            default_reached |= choice.template == default
            yield _Job(choice, device, label)
            for group in choice.groups if synthetic else ():   # each group template, for each of its models
                template = snapshot.lookup.get(f"groups/{group.casefold()}")
                if template and template != choice.template:
                    apply, final = snapshot.template_options(template)
                    yield _Job(dataclasses.replace(choice, template=template, apply_once=apply, final_command=final),
                               device, label)
        if default and not default_reached:
            device = self._identity(_ANY_MODEL_DEVICE)
            choice = snapshot.choose(device)
            if not choice.problem:
                yield _Job(choice, device, f"synthetic device {_ANY_MODEL_DEVICE} of a model no file names")

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
            try:
                scripts.append(self.pipeline.script(
                    self.snapshot, job.choice, device, RequestInfo("/", query, "192.0.2.10"), now))
            except ConfigurationError as error:
                self.add(self.template_file(error.file or job.template), error.line, error.cause, job.label)
                return
        source = self.snapshot.templates[job.template].text
        self._urls(job, scripts[0], source)
        if not job.choice.apply_once:
            return
        if apply_once(scripts[0], None).digest != apply_once(scripts[1], None).digest:
            self.add(self.template_file(job.template), 1,
                     "the part applied once changes from poll to poll (does it use now or request?): "
                     f"the device would apply it on every poll; move such lines above {EVERY_POLL_MARKER!r}", job.label)
        if _OWN_CHECK_LINE.search(scripts[0]):
            match = _OWN_CHECK_LINE.search(source)
            self.add(self.template_file(job.template), line_of(source, match.start()) if match else 1,
                     "a check line of its own while configserver applies the script once: "
                     "remove it, or turn that off with {# configserver: apply_once=false #}", job.label)
        for match in _OWN_APPLY_LINE.finditer(scripts[0]):
            line = match.group(0).strip()
            found = re.search(rf"^[ \t]*{re.escape(line)}[ \t]*$", source, re.IGNORECASE | re.MULTILINE)
            self.add(self.template_file(job.template), line_of(source, found.start()) if found else 1,
                     f"{line!r} of its own while configserver applies the script once: the answer would carry it "
                     "twice; remove it (configserver ends the script with config write and config activate)", job.label)

    def _urls(self, job: _Job, script: str, source: str) -> None:
        """URLs a real device could not reach: loopback, or the lab's built-in port."""
        for match in _URL.finditer(script):
            url, host, port = match.group(0), match["host"].strip("[]").lower(), match["port"]
            if host == "localhost" or host.startswith("127.") or host == "::1":
                why = "points at loopback: a device would call itself"
            elif port == str(LAB_PORT):
                why = f"uses port {str(LAB_PORT)}, the lab's built-in listener: production devices poll the terminator"
            else:
                continue
            self.add(*self._where_written(job, source, url), f"{url} {why}", job.label)

    def _where_written(self, job: _Job, source: str, text: str) -> tuple[str, int]:
        """The file and line that wrote `text` into a script: the template, or a vars file it reads."""
        found = source.find(text)
        if found >= 0:
            return self.template_file(job.template), line_of(source, found)
        for name in job.choice.vars_files:
            vars_source = self.snapshot.vars.get(name)
            if vars_source is not None and (found := vars_source.text.find(text)) >= 0:
                return self.vars_file(name), line_of(vars_source.text, found)
        return self.template_file(job.template), 1

    # -- firmware (configserver/firmware/): tables, builds, files, URLs ---------------------

    def firmware(self) -> None:
        devices = ((device, label) for device, label, _ in self._devices())
        for problem in check_firmware(self.snapshot, devices):
            self.add(self.vars_file(problem.file), problem.line, problem.message, problem.device)

    # -- end of firmware

    def coverage(self) -> None:
        """Devices no template can answer: they would get `404 # no configuration`."""
        if not self.snapshot.lookup:
            self.add(str(self.settings.templates), 1, "no template at all: every device would get "
                     "404 # no configuration; start from deploy/starter (README, Deploying)")
        elif "default" not in self.snapshot.lookup:
            self.add(self.template_file("default.j2"), 1, "missing: a device with no device, model or group "
                     "template of its own gets 404 # no configuration")


def _find_line(text: str, pattern: str) -> int:
    match = re.search(pattern, text, re.MULTILINE)
    return line_of(text, match.start()) if match else 1
