"""Rendering through the poll pipeline for each device the check knows, and what the scripts
say: render errors, a part applied once that changes every poll, lines the wrap adds itself,
URLs a device could not reach; and devices no template answers."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass

from ..apply_once import EVERY_POLL_MARKER, line_of
from ..content import Choice, ConfigurationError
from ..identity import DeviceIdentity
from ..lab.workspace import LAB_PORT
from ..poll import RequestInfo
from ._devices import ANY_MODEL, devices, identity
from ._findings import Findings

# A device of a model no file names, for a default template no named device reaches.
_ANY_MODEL_DEVICE = f"{ANY_MODEL}-00-00-00"
_OWN_APPLY_LINE = re.compile(r"^[ \t]*config[ \t]+(?:write|activate)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
_OWN_CHECK_LINE = re.compile(r"^[ \t]*mod[ \t]+cmd[ \t]+UP1[ \t]+check\b", re.IGNORECASE | re.MULTILINE)
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://(?P<host>\[[0-9a-f:.]+\]|[^/:\s\[\]]+)(?::(?P<port>\d+))?[^\s]*", re.IGNORECASE)
# two polls a day apart, the second reporting a serial: what changes between them is per poll
_POLLS = (
    (dt.datetime(2030, 1, 15, 10, 30, tzinfo=dt.timezone.utc), ""),
    (dt.datetime(2030, 1, 16, 13, 37, 11, tzinfo=dt.timezone.utc), "0123456789abcdef0123456789abcdef"),
)


@dataclass(frozen=True)
class _Job:
    """One template rendered for one device, with the choice that device would get for it."""

    choice: Choice
    device: DeviceIdentity
    label: str

    @property
    def template(self) -> str:
        return self.choice.template or ""


def check_rendering(found: Findings) -> None:
    rendered: set[tuple[str, str]] = set()
    for job in _jobs(found):
        if (job.template, job.device.hwid) not in rendered:
            rendered.add((job.template, job.device.hwid))
            _render(found, job)


def check_coverage(found: Findings) -> None:
    """Devices no template can answer: they would get `404 # no configuration`."""
    if not found.snapshot.lookup:
        found.add(str(found.settings.templates), 1, "no template at all: every device would get "
                  "404 # no configuration; start from deploy/starter (README, Deploying)")
    elif "default" not in found.snapshot.lookup:
        found.add(found.template_file("default.j2"), 1, "missing: a device with no device, model or group "
                  "template of its own gets 404 # no configuration")


def _jobs(found: Findings) -> Iterator[_Job]:
    snapshot = found.snapshot
    default, default_reached = snapshot.lookup.get("default"), False
    for device, label, synthetic in devices(found):
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
        device = identity(found, _ANY_MODEL_DEVICE)
        choice = snapshot.choose(device)
        if not choice.problem:
            yield _Job(choice, device, f"synthetic device {_ANY_MODEL_DEVICE} of a model no file names")


def _render(found: Findings, job: _Job) -> None:
    scripts = []
    device = job.device
    for now, reported in _POLLS:
        query = {"sn": device.mac.replace("-", ""), "hwid": device.hwid, "type": device.model,
                 "ip": "192.0.2.10", "ver": "13r3 sr1 [13.4711/134711/500]", "PROT": "13.4711", "BOOT": "134711",
                 "CHECK": reported}
        try:
            scripts.append(found.pipeline.script(
                found.snapshot, job.choice, device, RequestInfo("/", query, "192.0.2.10"), now))
        except ConfigurationError as error:
            found.add(found.template_file(error.file or job.template), error.line, error.cause, job.label)
            return
    source = found.snapshot.templates[job.template].text
    _urls(found, job, scripts[0], source)
    if not job.choice.apply_once:
        return
    file = found.template_file(job.template)
    digests = {found.pipeline.wrap(script, job.choice, None).digest for script in scripts}
    if len(digests) > 1:
        found.add(file, 1, "the part applied once changes from poll to poll (does it use now or request?): "
                  f"the device would apply it on every poll; move such lines above {EVERY_POLL_MARKER!r}", job.label)
    if _OWN_CHECK_LINE.search(scripts[0]):
        match = _OWN_CHECK_LINE.search(source)
        found.add(file, line_of(source, match.start()) if match else 1,
                  "a check line of its own while configserver applies the script once: "
                  "remove it, or turn that off with {# configserver: apply_once=false #}", job.label)
    for match in _OWN_APPLY_LINE.finditer(scripts[0]):
        line = match.group(0).strip()
        written = re.search(rf"^[ \t]*{re.escape(line)}[ \t]*$", source, re.IGNORECASE | re.MULTILINE)
        found.add(file, line_of(source, written.start()) if written else 1,
                  f"{line!r} of its own while configserver applies the script once: the answer would carry it "
                  "twice; remove it (configserver ends the script with config write and config activate)", job.label)


def _urls(found: Findings, job: _Job, script: str, source: str) -> None:
    """URLs a real device could not reach: loopback, or the lab's built-in port."""
    for match in _URL.finditer(script):
        url, host, port = match.group(0), match["host"].strip("[]").lower(), match["port"]
        if host == "localhost" or host.startswith("127.") or host == "::1":
            why = "points at loopback: a device would call itself"
        elif port == str(LAB_PORT):
            why = f"uses port {LAB_PORT}, the lab's built-in listener: production devices poll the terminator"
        else:
            continue
        found.add(*_where_written(found, job, source, url), f"{url} {why}", job.label)


def _where_written(found: Findings, job: _Job, source: str, text: str) -> tuple[str, int]:
    """The file and line that wrote `text` into a script: the template, or a vars file it reads."""
    at = source.find(text)
    if at >= 0:
        return found.template_file(job.template), line_of(source, at)
    for name in job.choice.vars_files:
        vars_source = found.snapshot.vars.get(name)
        if vars_source is not None and (at := vars_source.text.find(text)) >= 0:
            return found.vars_file(name), line_of(vars_source.text, at)
    return found.template_file(job.template), 1
