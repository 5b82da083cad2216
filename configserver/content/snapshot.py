"""One consistent view of the templates and vars folders, and the choice it makes for a device.

Lookup, first file that exists wins:
    templates/devices/<hwid>.j2, templates/devices/<mac>.j2, templates/models/<model>.j2,
    templates/groups/<group>.j2 (the model's groups in the groups table's order), templates/default.j2
Groups: the `groups` setting, then the `groups` table of vars/default.toml (group -> models).
Variables, later layers override earlier ones (tables merged key by key):
    vars/default.toml, vars/models/<model>.toml, vars/devices/<mac>.toml,
    vars/devices/<hwid>.toml, the row of vars/devices.csv that names the device

A snapshot's files and indexes never change once built; it only memoizes the choices it made.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..apply_once import TemplateOptions
from ..caches import BoundedCache
from ..identity import DeviceIdentity
from ..innovaphone import BROKEN_MODEL_NAMES
from .analysis import Analyses
from .naming import (
    DEVICES_CSV,
    TEMPLATE_SUFFIX,
    VARS_SUFFIX,
    csv_row_device,
    lookup_key,
)
from .variables import freeze, merge

log = logging.getLogger("configserver.templates")

_CHOICES_KEPT = 200_000  # devices whose choice one snapshot remembers

Stamp = tuple[int, int, int]   # (mtime_ns, size, inode): a different stamp is a different version


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One file as read at one moment: its text (or parsed data) and what identifies that version."""

    name: str            # path relative to its folder, with '/'
    stamp: Stamp
    text: str
    data: Any = None     # parsed TOML (dict) or CSV rows
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ContentRules:
    """What the settings say about content: fixes of broken model names, groups, apply-once defaults."""

    fixes: Mapping[str, str] = field(default_factory=lambda: BROKEN_MODEL_NAMES)
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    apply_once: bool = True
    final_command: str = "iresetn"


@dataclass(frozen=True)
class Choice:
    """What a device gets: the template to render, the variables, and where they came from."""

    template: str | None
    vars_files: tuple[str, ...]
    variables: Mapping[str, Any]
    problem: str | None = None   # a file this device reads cannot be used: file and cause
    groups: tuple[str, ...] = ()  # the device's model's groups, in the table's order
    apply_once: bool = True       # wrap the script for applying it once (apply_once.py)
    final_command: str = "iresetn"
    # the template (or one it uses) reads `now`, `request` or randomness: render it on every
    # poll; otherwise its output depends on the device and the snapshot alone and may be kept
    per_poll: bool = True


@dataclass(frozen=True, eq=False)
class Snapshot:
    """Templates and variables as one consistent view, with the indexes a choice needs."""

    templates: Mapping[str, SourceFile]
    vars: Mapping[str, SourceFile]
    rules: ContentRules
    lookup: Mapping[str, str]          # "devices/<key>", "models/<model>", "groups/<g>", "default" -> file
    vars_lookup: Mapping[str, str]
    csv_rows: Mapping[str, Mapping[str, str]]   # device key -> the values of its devices.csv row
    groups: Mapping[str, tuple[str, ...]]       # group -> models, table order
    model_groups: Mapping[str, tuple[str, ...]]  # casefolded model -> its groups
    groups_problem: str | None
    options: Mapping[str, TemplateOptions]      # template a device is given -> its options
    options_problems: Mapping[str, str]
    per_poll: Mapping[str, bool]                # template a device is given -> Choice.per_poll
    _choices: BoundedCache[str, Choice] = field(default_factory=lambda: BoundedCache(_CHOICES_KEPT), repr=False)
    _merged: dict[tuple[str, ...], Mapping[str, Any]] = field(default_factory=dict, repr=False)

    @property
    def fixes(self) -> Mapping[str, str]:
        return self.rules.fixes

    def choose(self, device: DeviceIdentity) -> Choice:
        """The template and variables for `device`; worked out once per device per snapshot."""
        choice = self._choices.get(device.hwid)
        if choice is None:
            choice = self._choices.put(device.hwid, self._choose(device))
        return choice

    def template_options(self, template: str) -> tuple[bool, str]:
        """(apply once?, final command) for a template a device is given: its options, else the settings'."""
        options = self.options.get(template, TemplateOptions())
        apply = self.rules.apply_once if options.apply_once is None else options.apply_once
        return apply, options.final_command or self.rules.final_command

    def _choose(self, device: DeviceIdentity) -> Choice:
        hwid, mac, model = device.hwid.casefold(), device.mac, device.model.casefold()
        groups = self.model_groups.get(model, ())
        template = None
        group_keys = (f"groups/{group.casefold()}" for group in groups)
        for key in (f"devices/{hwid}", f"devices/{mac}", f"models/{model}", *group_keys, "default"):
            template = self.lookup.get(key)
            if template:
                break
        layers: list[tuple[str, Mapping[str, Any]]] = []  # (which file or CSV row, its variables)
        problem = self.groups_problem or self.options_problems.get(template or "")
        if template and self.templates[template].error:
            problem = problem or f"{template}: {self.templates[template].error}"
        table = self.vars.get(DEVICES_CSV)
        if table is not None and table.error:
            # every device may have a row in it: none may be served as if it had none
            problem = problem or f"{DEVICES_CSV}: {table.error}"
        for key in ("default", f"models/{model}", f"devices/{mac}", f"devices/{hwid}"):
            name = self.vars_lookup.get(key)
            if name is None:
                continue
            source = self.vars[name]
            if source.error:
                problem = problem or f"{name}: {source.error}"
                continue
            layers.append((name, source.data))
        for key in (mac, hwid):
            row = self.csv_rows.get(key)
            if row is not None:
                layers.append((f"{DEVICES_CSV}:{key}", row))
        # devices that read the same files share one merged copy (most share all but one)
        layers_key = tuple(which for which, _ in layers)
        variables = self._merged.get(layers_key)
        if variables is None:
            merged: dict[str, Any] = {}
            for _, data in layers:
                merged = merge(merged, data)
            variables = self._merged[layers_key] = freeze(merged)
        used = tuple(dict.fromkeys(which.partition(":")[0] for which in layers_key))
        apply, final = self.template_options(template) if template else (self.rules.apply_once, self.rules.final_command)
        return Choice(template, used, variables, problem, groups, apply, final, self.per_poll.get(template or "", True))


def build_snapshot(
    templates: Mapping[str, SourceFile], variables: Mapping[str, SourceFile], rules: ContentRules,
    analyses: Analyses | None = None,
) -> Snapshot:
    """Index the files of both folders into a snapshot. `analyses` remembers what was learned of
    each template version across snapshots (see analysis.py)."""
    analyses = analyses or Analyses()
    fixes = rules.fixes
    lookup: dict[str, str] = {}
    for name in sorted(templates):
        key = lookup_key(name, TEMPLATE_SUFFIX, fixes)
        if key is None:
            continue
        if key in lookup:
            log.warning("two templates for one key", extra={"fields": {
                "event": "template_conflict", "key": key, "used": lookup[key], "ignored": name}})
            continue
        lookup[key] = name
    vars_lookup: dict[str, str] = {}
    for name in sorted(variables):
        key = lookup_key(name, VARS_SUFFIX, fixes)
        if key is not None and key not in vars_lookup:
            vars_lookup[key] = name
    csv_rows: dict[str, dict[str, str]] = {}
    table = variables.get(DEVICES_CSV)
    for row in (table.data or []) if table is not None else []:
        named = csv_row_device(row.get("hwid"), row.get("mac"), fixes)
        if named.key is not None:
            csv_rows[named.key] = {k: v for k, v in row.items() if k and k not in ("hwid", "mac") and v not in (None, "")}
    groups, model_groups, groups_problem = _groups(rules, variables.get("default.toml"))
    options: dict[str, TemplateOptions] = {}
    problems: dict[str, str] = {}
    given = set(lookup.values())
    for name in given:
        found = analyses.options(name, templates[name].stamp, templates[name].text)
        if isinstance(found, str):
            problems[name] = found
        else:
            options[name] = found
    texts = {name: (source.stamp, source.text) for name, source in templates.items()}
    analyses.forget_except({name: stamp for name, (stamp, _) in texts.items()})
    per_poll = {name: analyses.reads_per_poll(name, texts) for name in given}
    return Snapshot(
        templates=dict(templates), vars=dict(variables), rules=rules, lookup=lookup, vars_lookup=vars_lookup,
        csv_rows=csv_rows, groups=groups, model_groups=model_groups, groups_problem=groups_problem,
        options=options, options_problems=problems, per_poll=per_poll,
    )


def empty_snapshot(rules: ContentRules) -> Snapshot:
    """The snapshot before the first scan: no device gets a template."""
    return build_snapshot({}, {}, rules)


def _groups(
    rules: ContentRules, default: SourceFile | None,
) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]], str | None]:
    """The groups table (settings, then default.toml), each model's groups, and a problem."""
    table = {name: tuple(models) for name, models in rules.groups.items()}
    problem = None
    data = default.data if default is not None and isinstance(default.data, dict) else {}
    extra = data.get("groups", {})
    if not isinstance(extra, dict) or not all(
        isinstance(models, list) and all(isinstance(m, str) for m in models) for models in extra.values()
    ):
        problem = "default.toml: groups must be a table of group = [model, ...]"
        extra = {}
    for name, models in extra.items():
        table[name] = tuple(dict.fromkeys((*table.get(name, ()), *models)))
    model_groups: dict[str, tuple[str, ...]] = {}
    for name, models in table.items():
        for model in models:
            model = rules.fixes.get(model, model).casefold()
            if name not in model_groups.get(model, ()):
                model_groups[model] = (*model_groups.get(model, ()), name)
    return table, model_groups, problem
