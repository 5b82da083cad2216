"""Templates and variables: what is on disk, which of it a device gets, and rendering.

A background scan (`TemplateStore.refresh`, run off the event loop) turns the two folders into
an immutable `Snapshot`; a poll only ever reads the current snapshot, so its cost does not grow
with the number of files. A file modified less than `grace_seconds` ago is not read yet: the
snapshot keeps the last version that was complete, so a file being written never yields half a
script.

Lookup, first file that exists wins:
    templates/devices/<hwid>.j2, templates/devices/<mac>.j2, templates/models/<model>.j2,
    templates/groups/<group>.j2 (the model's groups in the groups table's order), templates/default.j2
Groups: the `groups` setting, then the `groups` table of vars/default.toml (group -> models).
A template a device is given may carry apply-once options, `{# configserver: ... #}`
(apply_once.py), read once per version of the file.
Variables, later layers override earlier ones (tables merged key by key):
    vars/default.toml, vars/models/<model>.toml, vars/devices/<mac>.toml,
    vars/devices/<hwid>.toml, the `mac` row and the `hwid` row of vars/devices.csv
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import stat
import threading
import time
import tomllib
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jinja2
from jinja2 import nodes

from .apply_once import OptionsError, TemplateOptions, parse_options
from .identity import BROKEN_MODEL_NAMES, DeviceIdentity, InvalidDeviceName, normalize_mac, parse_device_name

log = logging.getLogger("configserver.templates")

TEMPLATE_SUFFIX = ".j2"
_MAX_FILE_BYTES = 4 * 1024 * 1024
_CHOICES_KEPT = 200_000  # devices whose choice one snapshot remembers
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_NO_VARIABLE = re.compile(r"'mappingproxy object' has no attribute '([^']*)'")


class ConfigurationError(Exception):
    """A device's configuration cannot be produced; the text names the file, line and cause."""

    def __init__(self, cause: str, file: str | None = None, line: int | None = None) -> None:
        where = f"{file}:{line}: " if file and line else (f"{file}: " if file else "")
        super().__init__(f"{where}{cause}")
        self.cause, self.file, self.line = cause, file, line


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One file as read at one moment: its text (or parsed data) and what identifies that version."""

    name: str            # path relative to its folder, with '/'
    stamp: tuple[int, int, int]  # (mtime_ns, size, inode): a different stamp is a different version
    text: str
    data: Any = None     # parsed TOML (dict) or CSV rows
    error: str | None = None


@dataclass(frozen=True)
class Choice:
    """What a device gets: the template to render, the variables, and where they came from."""

    template: str | None
    vars_files: tuple[str, ...]
    variables: Mapping[str, Any]
    problem: str | None = None   # a vars file this device reads could not be parsed
    groups: tuple[str, ...] = ()  # the device's model's groups, in the table's order
    apply_once: bool = True       # wrap the script for applying it once (apply_once.py)
    final_command: str = "iresetn"
    # the template (or one it uses) reads `now`, `request` or randomness: render it on every
    # poll; otherwise its output depends on the device and the snapshot alone and may be kept
    per_poll: bool = True


def _no_parse(name: str, text: str) -> tuple[Any, str | None]:
    return None, None


def device_key(stem: str, fixes: Mapping[str, str] = BROKEN_MODEL_NAMES) -> str:
    """The lookup key of a per-device file name: a MAC or a hwid, matched without regard to case."""
    mac = normalize_mac(stem)
    if mac:
        return mac
    try:
        return parse_device_name(stem, fixes).hwid.casefold()
    except InvalidDeviceName:
        return stem.casefold()


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _merge(base: dict[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


@dataclass
class Snapshot:
    """Templates and variables as one consistent view. Never changed once published."""

    templates: dict[str, SourceFile] = field(default_factory=dict)
    vars: dict[str, SourceFile] = field(default_factory=dict)
    lookup: dict[str, str] = field(default_factory=dict)   # "devices/<key>", "models/<model>", "default"
    vars_lookup: dict[str, str] = field(default_factory=dict)
    csv_rows: dict[str, dict[str, str]] = field(default_factory=dict)  # device key -> row
    fixes: Mapping[str, str] = field(default_factory=lambda: BROKEN_MODEL_NAMES)
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # group -> models, table order
    model_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # casefolded model -> groups
    groups_problem: str | None = None
    options: dict[str, TemplateOptions] = field(default_factory=dict)  # lookup template -> its options
    options_problems: dict[str, str] = field(default_factory=dict)
    apply_once: bool = True          # the settings' defaults, for templates that say nothing
    final_command: str = "iresetn"
    per_poll: dict[str, bool] = field(default_factory=dict)  # lookup template -> Choice.per_poll
    # answers the web layer computed for a device from this snapshot (see Choice.per_poll)
    answers: dict[DeviceIdentity, Any] = field(default_factory=dict)
    _choices: dict[str, Choice] = field(default_factory=dict)
    _merged: dict[tuple[str, ...], Mapping[str, Any]] = field(default_factory=dict)

    def choose(self, device: DeviceIdentity) -> Choice:
        """The template and variables for `device`; computed once per device per snapshot."""
        choice = self._choices.get(device.hwid)
        if choice is None:
            choice = self._choose(device)
            if len(self._choices) < _CHOICES_KEPT:
                self._choices[device.hwid] = choice
        return choice

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
        used: list[str] = []
        problem = self.groups_problem or self.options_problems.get(template or "")
        if template and self.templates[template].error:
            problem = problem or f"{template}: {self.templates[template].error}"
        table = self.vars.get("devices.csv")
        if table is not None and table.error:
            # every device may have a row in it: none may be served as if it had none
            problem = problem or f"devices.csv: {table.error}"
        for key in ("default", f"models/{model}", f"devices/{mac}", f"devices/{hwid}"):
            name = self.vars_lookup.get(key)
            if name is None:
                continue
            source = self.vars[name]
            if source.error:
                problem = problem or f"{name}: {source.error}"
                continue
            layers.append((name, source.data))
            used.append(name)
        for key in (mac, hwid):
            row = self.csv_rows.get(key)
            if row is not None:
                layers.append((f"devices.csv:{key}", row))
                used.append("devices.csv")
        # devices that read the same files share one merged copy (most share all but none)
        layers_key = tuple(which for which, _ in layers)
        variables = self._merged.get(layers_key)
        if variables is None:
            merged: dict[str, Any] = {}
            for _, data in layers:
                merged = _merge(merged, data)
            variables = self._merged[layers_key] = _freeze(merged)
        options = self.options.get(template or "", TemplateOptions())
        return Choice(
            template, tuple(dict.fromkeys(used)), variables, problem, groups,
            self.apply_once if options.apply_once is None else options.apply_once,
            options.final_command or self.final_command,
            self.per_poll.get(template or "", True),
        )


# Context names whose value changes from poll to poll, and Jinja's random helpers.
_PER_POLL_NAMES = frozenset({"now", "request", "lipsum"})
_PER_POLL_FILTERS = frozenset({"random"})


def _template_facts(environment: jinja2.Environment, source: str) -> tuple[bool, tuple[str, ...]]:
    """Whether one template's own text reads per-poll values, and the templates it references.

    A reference computed at render time (`{% include vars.x %}`) counts as reading per-poll
    values: which file it names cannot be known before. Unparsable text too: its render fails.
    """
    try:
        ast = environment.parse(source)
    except Exception:  # a syntax error, or absurd nesting: the render will fail and say why
        return True, ()
    if any(node.name in _PER_POLL_NAMES for node in ast.find_all(nodes.Name)):
        return True, ()
    if any(node.name in _PER_POLL_FILTERS for node in ast.find_all(nodes.Filter)):
        return True, ()
    # a filter or test named by a string, as in map('random')
    if any(node.value in _PER_POLL_FILTERS for node in ast.find_all(nodes.Const) if isinstance(node.value, str)):
        return True, ()
    references: list[str] = []
    for node in ast.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        target = node.template
        names = target.items if isinstance(target, (nodes.List, nodes.Tuple)) else [target]
        for item in names:
            if not (isinstance(item, nodes.Const) and isinstance(item.value, str)):
                return True, ()
            references.append(item.value)
    return False, tuple(references)


class _SnapshotLoader(jinja2.BaseLoader):
    """Serves template sources from the current snapshot: no file system access while rendering,
    and no name that is not a file below the templates folder can ever be loaded."""

    def __init__(self, store: "TemplateStore") -> None:
        self._store = store

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str, Callable[[], bool]]:
        source = self._store.snapshot.templates.get(template)
        if source is None:
            raise jinja2.TemplateNotFound(template)
        if source.error:
            raise jinja2.TemplateError(f"{template}: {source.error}")
        store = self._store
        return source.text, str(store.templates_dir / template), lambda: store.snapshot.templates.get(template) is source

    def list_templates(self) -> list[str]:
        return sorted(self._store.snapshot.templates)


class TemplateStore:
    """The templates and vars folders, scanned into snapshots, and the Jinja environment."""

    def __init__(
        self,
        templates_dir: Path,
        vars_dir: Path,
        *,
        grace_seconds: float = 1.0,
        cn_fixes: Mapping[str, str] | None = None,
        groups: Mapping[str, Sequence[str]] | None = None,
        apply_once: bool = True,
        final_command: str = "iresetn",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.templates_dir = Path(templates_dir).absolute()
        self.vars_dir = Path(vars_dir).absolute()
        self.grace_seconds = grace_seconds
        self._groups = {name: tuple(models) for name, models in (groups or {}).items()}
        self._apply_once, self._final_command = apply_once, final_command
        # changes not yet published: (kind, name) -> (the version seen, or None if gone; since when)
        self._unsettled: dict[tuple[str, str], tuple[tuple[int, int, int] | None, float]] = {}
        # (file, version) -> (reads per-poll values?, templates it references): parsed once per version
        self._facts: dict[tuple[str, tuple[int, int, int]], tuple[bool, tuple[str, ...]]] = {}
        self._fixes = {**BROKEN_MODEL_NAMES, **(cn_fixes or {})}
        self._clock = clock
        self._lock = threading.Lock()
        self.snapshot = Snapshot(fixes=self._fixes)
        self.environment = jinja2.Environment(
            loader=_SnapshotLoader(self),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            auto_reload=True,
            cache_size=-1,
        )

    # -- scanning (off the event loop) -------------------------------------------------------

    def refresh(self) -> bool:
        """Rescan both folders; publish a new snapshot once every change in them has settled.

        Returns whether a new snapshot was published. While any file is new, changed or gone
        for less than `grace_seconds`, the snapshot in use stays as it is, whole: a file being
        written never yields half a script, and a change spread over several files (a git
        checkout, an rsync) is taken at once instead of file by file.
        """
        with self._lock:
            old = self.snapshot
            now = self._clock()
            listed = {("templates", name): found for name, found in self._list(self.templates_dir).items()}
            listed.update({("vars", name): found for name, found in self._list(self.vars_dir).items()})
            published = {("templates", name): source for name, source in old.templates.items()}
            published.update({("vars", name): source for name, source in old.vars.items()})
            changed = [key for key, (_, stamp) in listed.items() if key not in published or published[key].stamp != stamp]
            vanished = [key for key in published if key not in listed]
            if not changed and not vanished:
                self._unsettled.clear()
                return False
            if not self._settled(changed, vanished, listed, now):
                return False
            files = {"templates": dict(old.templates), "vars": dict(old.vars)}
            for kind, name in vanished:
                del files[kind][name]
            for key in changed:
                kind, name = key
                path, stamp = listed[key]
                source = self._read(path, name, stamp, self._parse_vars if kind == "vars" else _no_parse)
                if source is None:  # written to while we read it: wait for it to settle
                    self._unsettled[key] = (None, now)
                    return False
                files[kind][name] = source
            self.snapshot = self._index(files["templates"], files["vars"])
            self._unsettled.clear()
            log.info("templates reloaded", extra={"fields": {
                "event": "reload", "templates": len(files["templates"]), "vars": len(files["vars"]),
                "changed": len(changed), "removed": len(vanished),
            }})
            return True

    @property
    def pending(self) -> bool:
        """Whether a change is waiting to settle before it is published."""
        return bool(self._unsettled)

    def settle(self, timeout: float = 10.0) -> None:
        """Refresh until no change is pending (or `timeout` passes): for start-up, so that the
        first poll never meets an empty snapshot because a file was still settling."""
        deadline = self._clock() + timeout
        self.refresh()
        while self.pending and self._clock() < deadline:
            time.sleep(min(0.1, max(self.grace_seconds / 4, 0.01)))
            self.refresh()

    def _settled(
        self,
        changed: list[tuple[str, str]],
        vanished: list[tuple[str, str]],
        listed: dict[tuple[str, str], tuple[Path, tuple[int, int, int]]],
        now: float,
    ) -> bool:
        """Whether every change may be published: each file's new version (or its absence) has
        stayed the same for `grace_seconds` by our own clock, or the file was last modified at
        least that long ago. A modification time ahead of our clock proves nothing either way."""
        pending: dict[tuple[str, str], tuple[tuple[int, int, int] | None, float]] = {}
        for key in [*changed, *vanished]:
            stamp = listed[key][1] if key in listed else None
            if stamp is not None and 0 <= now - stamp[0] / 1e9 and now - stamp[0] / 1e9 >= self.grace_seconds:
                continue
            since = self._unsettled.get(key)
            if since is None or since[0] != stamp:
                since = (stamp, now)
            if now - since[1] < self.grace_seconds:
                pending[key] = since
        self._unsettled = pending
        return not pending

    @staticmethod
    def _list(root: Path) -> dict[str, tuple[Path, tuple[int, int, int]]]:
        """Every file below `root` that is not hidden or an editor's leftover, with its version."""
        found: dict[str, tuple[Path, tuple[int, int, int]]] = {}
        if not root.is_dir():
            return found
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for filename in filenames:
                if filename.startswith(".") or filename.endswith(("~", ".swp", ".tmp", ".part")):
                    continue
                path = Path(dirpath, filename)
                try:
                    st = path.stat()
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                found[path.relative_to(root).as_posix()] = (path, (st.st_mtime_ns, st.st_size, st.st_ino))
        return found

    @staticmethod
    def _read(
        path: Path, name: str, stamp: tuple[int, int, int], parse: Callable[[str, str], tuple[Any, str | None]],
    ) -> SourceFile | None:
        """The file's text and parsed data, an error the admin must fix, or None when the file
        changed while it was read (then it is still being written)."""
        try:
            with path.open("rb") as file:
                if stamp[1] > _MAX_FILE_BYTES:
                    raise ValueError(f"larger than {_MAX_FILE_BYTES} bytes")
                data = file.read(_MAX_FILE_BYTES + 1)
                after = os.fstat(file.fileno())
            if (after.st_mtime_ns, after.st_size, after.st_ino) != stamp:
                return None
            text = data.decode("utf-8-sig")  # a byte order mark (Excel's "CSV UTF-8") is no content
        except UnicodeDecodeError as exc:
            return SourceFile(name, stamp, "", None, f"not UTF-8 text (byte {exc.start}): save it as UTF-8")
        except (OSError, ValueError) as exc:
            return SourceFile(name, stamp, "", None, f"cannot read: {exc}")
        data_parsed, error = parse(name, text)
        return SourceFile(name, stamp, text, data_parsed, error)

    @staticmethod
    def _parse_vars(name: str, text: str) -> tuple[Any, str | None]:
        try:
            if name.endswith(".toml"):
                return tomllib.loads(text), None
            if name.endswith(".csv"):
                return list(csv.DictReader(io.StringIO(text))), None
        except tomllib.TOMLDecodeError as exc:
            return None, f"not valid TOML: {exc}"
        except csv.Error as exc:
            return None, f"not valid CSV: {exc}"
        except Exception as exc:  # RecursionError on absurd nesting, and the like: still the file's fault
            return None, f"cannot be read as {name.rsplit('.', 1)[-1].upper()}: {type(exc).__name__}: {exc}"
        return None, None

    def _index(self, templates: dict[str, SourceFile], variables: dict[str, SourceFile]) -> Snapshot:
        snapshot = Snapshot(
            templates=templates, vars=variables, fixes=self._fixes,
            apply_once=self._apply_once, final_command=self._final_command,
        )
        for name in sorted(templates):
            key = self._lookup_key(name, TEMPLATE_SUFFIX)
            if key is None:
                continue
            if key in snapshot.lookup:
                log.warning("two templates for one key", extra={"fields": {"event": "template_conflict", "key": key, "used": snapshot.lookup[key], "ignored": name}})
                continue
            snapshot.lookup[key] = name
        for name in sorted(variables):
            key = self._lookup_key(name, ".toml")
            if key is not None and key not in snapshot.vars_lookup:
                snapshot.vars_lookup[key] = name
        table = variables.get("devices.csv")
        if table is not None and table.data:
            for row in table.data:
                ident = (row.get("hwid") or row.get("mac") or "").strip()
                if not ident:
                    continue
                values = {k: v for k, v in row.items() if k and k not in ("hwid", "mac") and v not in (None, "")}
                snapshot.csv_rows[device_key(ident, self._fixes)] = values
        self._index_groups(snapshot, variables.get("default.toml"))
        previous = self.snapshot   # a template version's options are parsed once
        for name in set(snapshot.lookup.values()):
            unchanged = previous.templates.get(name) is templates[name]
            if unchanged and name in previous.options:
                snapshot.options[name] = previous.options[name]
            elif unchanged and name in previous.options_problems:
                snapshot.options_problems[name] = previous.options_problems[name]
            else:
                try:
                    snapshot.options[name] = parse_options(templates[name].text)
                except OptionsError as error:
                    snapshot.options_problems[name] = f"{name}:{error.line}: {error.message}"
        self._facts = {
            key: facts for key, facts in self._facts.items()
            if key[0] in templates and templates[key[0]].stamp == key[1]
        }
        for name in set(snapshot.lookup.values()):
            snapshot.per_poll[name] = self._reads_per_poll(name, templates)
        return snapshot

    def _reads_per_poll(self, name: str, templates: dict[str, SourceFile]) -> bool:
        """Whether `name`, or any template it includes, imports or extends, reads what changes
        from poll to poll (`now`, `request`, randomness) or names a template only at render time."""
        seen: set[str] = set()
        pending = [name]
        while pending:
            current = pending.pop()
            if current in seen:
                continue
            seen.add(current)
            source = templates.get(current)
            if source is None:
                continue  # a missing include fails the render anyway
            key = (current, source.stamp)
            facts = self._facts.get(key)
            if facts is None:
                facts = self._facts[key] = _template_facts(self.environment, source.text)
            reads_per_poll, references = facts
            if reads_per_poll:
                return True
            pending.extend(references)
        return False

    def _index_groups(self, snapshot: Snapshot, default: SourceFile | None) -> None:
        table = dict(self._groups)
        data = default.data if default is not None and isinstance(default.data, dict) else {}
        extra = data.get("groups", {})
        if not isinstance(extra, dict) or not all(
            isinstance(models, list) and all(isinstance(m, str) for m in models) for models in extra.values()
        ):
            snapshot.groups_problem = "default.toml: groups must be a table of group = [model, ...]"
            extra = {}
        for name, models in extra.items():
            table[name] = tuple(dict.fromkeys((*table.get(name, ()), *models)))
        snapshot.groups = table
        for name, models in table.items():
            for model in models:
                model = self._fixes.get(model, model).casefold()
                if name not in snapshot.model_groups.get(model, ()):
                    snapshot.model_groups[model] = (*snapshot.model_groups.get(model, ()), name)

    def _lookup_key(self, name: str, suffix: str) -> str | None:
        if not name.endswith(suffix):
            return None
        stem = name[: -len(suffix)]
        if stem == "default":
            return "default"
        folder, _, rest = stem.partition("/")
        if not rest or "/" in rest:
            return None
        if folder == "devices":
            return f"devices/{device_key(rest, self._fixes)}"
        if folder == "models":
            return f"models/{rest.casefold()}"
        if folder == "groups" and suffix == TEMPLATE_SUFFIX:
            return f"groups/{rest.casefold()}"
        return None

    # -- rendering (on the event loop: CPU only, no I/O) -------------------------------------

    def render(self, template: str, context: Mapping[str, Any]) -> str:
        """Render `template` with `context` into a complete script with CRLF line ends.

        Raises ConfigurationError naming the template file, line and cause of any failure
        (syntax error, undefined variable, missing include...). Never returns half a script.
        """
        try:
            text = self.environment.get_template(template).render(context)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigurationError(f"syntax error: {exc.message}", exc.name or template, exc.lineno) from None
        except jinja2.TemplateNotFound as exc:
            file, line = self._where(exc, template)
            raise ConfigurationError(f"template not found: {exc.name}", file, line) from None
        except Exception as exc:  # anything a template raises: undefined variables, type errors...
            file, line = self._where(exc, template)
            message = exc.message if isinstance(exc, jinja2.TemplateError) and exc.message else str(exc)
            # `vars` and its tables are read-only mappings: say so in the admin's words
            message = _NO_VARIABLE.sub(r"undefined variable '\1'", message)
            raise ConfigurationError(f"{type(exc).__name__}: {message}", file, line) from None
        return to_crlf(text)

    def _where(self, exc: BaseException, template: str) -> tuple[str, int | None]:
        root = str(self.templates_dir) + os.sep
        for frame in reversed(traceback.extract_tb(exc.__traceback__)):
            if frame.filename.startswith(root):
                return frame.filename[len(root):], frame.lineno
        return template, None


def to_crlf(text: str) -> str:
    """Every line ending in CRLF, whatever line endings the template file had."""
    lines = _LINE_BREAK.split(text)
    if lines and lines[-1] == "":
        lines.pop()
    return "\r\n".join(lines) + "\r\n" if lines else ""
